"""Rerun the small-scale reproduction of the paper's appendices A (localisation) and B (transfer).

Usage, from the repository root, after the README's demo (it trains the classifier,
snapshots/demo_iter_1950.npz) and tools/run_experiments.py (the A_cont, D and E nets):

    python tools/run_appendices.py              # every step; finished steps are skipped
    python tools/run_appendices.py --dry-run    # print the commands only
    python tools/run_appendices.py --force      # redo every step (else trained regressors are kept)

Appendix A: box regressors made from the demo's net A by `vggcaffe localize_net` (PCR or
SCR; fine-tuning all layers or only the FC ones; S = 32, or S jittered in [32, 48] or [32, 64]),
trained on the 366 `train` images of ../shared/data/boxes and scored by `vggcaffe
localize` on its 134 `val` images. Appendix B: `vggcaffe transfer` on Caltech-101 at
32 px (../shared/data/transfer). Nets and solvers go to experiments/nets/, logs to
experiments/logs/appendix_*.txt, the tables to experiments/appendices.md.
"""
import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NETS, LOGS = Path("experiments/nets"), Path("experiments/logs")
BOXES, CALTECH = "../shared/data/boxes", "../shared/data/transfer/caltech101_32.npz"
CLASSIFIER, CLASSIFIER_NET = "snapshots/demo_iter_1950.npz", "models/small/A_train_val.prototxt"
LOC_ITERS, LOC_LR = 1000, 0.01
# (name, localize_net flags, dense test scales)
REGRESSORS = [
    ("loc_A_pcr_all", [], "32"),
    ("loc_A_scr_all", ["--scr"], "32"),
    ("loc_A_pcr_fc", ["--finetune", "fc"], "32"),
    ("loc_A_scr_fc", ["--scr", "--finetune", "fc"], "32"),
    ("loc_A_pcr_all_S32-48", ["--scales", "32,48"], "32,40,48"),
    ("loc_A_scr_all_S32-48", ["--scr", "--scales", "32,48"], "32,40,48"),
    ("loc_A_pcr_all_S32-64", ["--scales", "32,64"], "32,48,64"),
]
FUSED = "loc_A_pcr+scr_S32-48"
SNAPS = "snapshots/experiments"
# (name, [(net, weights)], transfer flags)
TRANSFERS = [
    ("transfer_A_Q32", [(CLASSIFIER_NET, CLASSIFIER)], ["--scales", "32"]),
    ("transfer_A_Q32-64_stack", [(CLASSIFIER_NET, CLASSIFIER)], ["--scales", "32,48,64"]),
    ("transfer_A_Q32-64_average", [(CLASSIFIER_NET, CLASSIFIER)], ["--scales", "32,48,64", "--aggregate", "average"]),
    ("transfer_A_fc6_Q32-64_stack", [(CLASSIFIER_NET, CLASSIFIER)], ["--scales", "32,48,64", "--layer", "fc6"]),
    ("transfer_A_pool5_Q32-64_stack", [(CLASSIFIER_NET, CLASSIFIER)], ["--scales", "32,48,64", "--layer", "pool5"]),
    ("transfer_A_untrained_Q32-64_stack", [(CLASSIFIER_NET, "snapshots/experiments/A_untrained.npz")],
     ["--scales", "32,48,64"]),
    ("transfer_D_Q32-64_stack", [("experiments/nets/D_train_val.prototxt", f"{SNAPS}/D_iter_400.npz")],
     ["--scales", "32,48,64"]),
    ("transfer_E_Q32-64_stack", [("experiments/nets/E_train_val.prototxt", f"{SNAPS}/E_iter_400.npz")],
     ["--scales", "32,48,64"]),
    ("transfer_D+E_Q32-64_stack", [("experiments/nets/D_train_val.prototxt", f"{SNAPS}/D_iter_400.npz"),
                                   ("experiments/nets/E_train_val.prototxt", f"{SNAPS}/E_iter_400.npz")],
     ["--scales", "32,48,64"]),
]


def steps():
    """(name, [(command, file it makes or None)]) in order."""
    out = []
    for name, flags, scales in REGRESSORS:
        prefix, weights = NETS / name, f"snapshots/{name}_iter_{LOC_ITERS}.npz"
        out.append((name, [
            (["vggcaffe", "localize_net", "--model", CLASSIFIER_NET, "--source", BOXES, *flags,
              "--max-iter", str(LOC_ITERS), "--base-lr", str(LOC_LR), "-o", str(prefix)], weights),
            (["vggcaffe", "train", "--solver", f"{prefix}_solver.prototxt", "--weights", CLASSIFIER], weights),
            *[(["vggcaffe", "localize", "--model", f"{prefix}_train_val.prototxt", "--weights", weights,
                "--classifier", CLASSIFIER, "--classifier-model", CLASSIFIER_NET, "--scales", qs], None)
              for qs in dict.fromkeys(["32", scales])]]))
    pcr, scr = "loc_A_pcr_all_S32-48", "loc_A_scr_all_S32-48"          # the paper's union of nets
    out.append((FUSED, [(["vggcaffe", "localize", "--model", f"{NETS / pcr}_train_val.prototxt",
                          "--weights", f"snapshots/{pcr}_iter_{LOC_ITERS}.npz", "--fuse",
                          f"{NETS / scr}_train_val.prototxt:snapshots/{scr}_iter_{LOC_ITERS}.npz",
                          "--classifier", CLASSIFIER, "--classifier-model", CLASSIFIER_NET, "--scales", qs], None)
                        for qs in ("32", "32,40,48")]))
    untrained = [sys.executable, "-c", "import vggcaffe; vggcaffe.Net("
                 f"'{CLASSIFIER_NET}', phase='TRAIN', seed=1701).save('{SNAPS}/A_untrained.npz')"]
    for name, models, flags in TRANSFERS:
        (net, weights), rest = models[0], models[1:]
        cmd = ["vggcaffe", "transfer", "--model", net, "--weights", weights, "--source", CALTECH, *flags]
        if rest:
            cmd += ["--fuse", ",".join(f"{n}:{w}" for n, w in rest)]
        out.append((name, ([(untrained, weights)] if "untrained" in weights else []) + [(cmd, None)]))
    return out


def tables(log):
    """The rows printed after each table header of a step's log."""
    text = log.read_text()
    loc = re.findall(r"dense Q = ([\d, ]+);.*?\nmethod +error\n((?:.+%\n)+)", text)
    if loc:
        return [(q.replace(" ", ""), row.rsplit(None, 1)) for q, rows in loc for row in rows.splitlines()]
    return [("", line.split()) for line in re.findall(r"^model .*mean class recall.*\n(.+)$", text, re.M)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    LOGS.mkdir(parents=True, exist_ok=True)
    Path(SNAPS).mkdir(parents=True, exist_ok=True)
    lines = ["# Appendices A and B at small scale (written by tools/run_appendices.py)", ""]
    for name, commands in steps():
        log = LOGS / f"appendix_{name}.txt"
        for cmd, _ in commands:
            print(shlex.join(cmd), flush=True)
        if args.dry_run or (log.exists() and not args.force):
            continue
        with open(log, "w") as f:
            for cmd, makes in commands:
                if makes and Path(makes).exists() and not args.force:     # e.g. a trained regressor
                    f.write(f"# {makes} exists: skipped $ {shlex.join(cmd)}\n")
                    continue
                f.write(f"$ {shlex.join(cmd)}\n")
                f.flush()
                subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    if args.dry_run:
        return
    lines += ["| regressor | dense Q | method | error % |", "|---|---|---|---|"]
    for name in [r[0] for r in REGRESSORS] + [FUSED]:
        for q, (method, error) in tables(LOGS / f"appendix_{name}.txt"):
            lines.append(f"| {name} | {q} | {method.strip()} | {error.rstrip('%')} |")
    lines += ["", "| transfer | models | descriptor dims | C | mean class recall % | accuracy % |",
              "|---|---|---|---|---|---|"]
    for name, _, _ in TRANSFERS:
        for _, row in tables(LOGS / f"appendix_{name}.txt"):
            lines.append(f"| {name} | {row[0]} | {row[1]} | {row[2]} | {row[3].rstrip('%')} | {row[4].rstrip('%')} |")
    Path("experiments/appendices.md").write_text("\n".join(lines) + "\n")
    print("wrote experiments/appendices.md")


if __name__ == "__main__":
    main()
