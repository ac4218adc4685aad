"""The command line's argument checks (vggcaffe/argtypes.py): a wrong number or a missing folder is one
line from argparse."""
import pytest

from vggcaffe.cli import main

SMALL_A = "models/small/A_train_val.prototxt"


@pytest.mark.parametrize("argv, message", [
    (["test", "--weights", "w.npz", "--dense", "--scales", "32,abc"], "'32,abc' is not a comma-separated list"),
    (["test", "--weights", "w.npz", "--dense", "--scales", "-32"], "sizes must be positive"),
    (["test", "--weights", "w.npz", "--multi-crop", "--grid", "0"], "--grid: must be at least 1, got 0"),
    (["test", "--weights", "w.npz", "--dense", "--batch", "-5"], "--batch: must be at least 1, got -5"),
    (["time", "--model", SMALL_A, "--iterations", "0"], "-iterations: must be at least 1"),
    (["summary", SMALL_A, "--batch", "x"], "'x' is not an integer"),
    (["transfer", "--weights", "w.npz", "--source", "s.npz", "--svm-c", "-1"], "--svm-c: must be above 0"),
    (["transfer", "--weights", "w.npz", "--source", "s.npz", "--features", "/nonexistent_dir/f.npz"],
     "folder /nonexistent_dir does not exist"),
    (["localize", "--weights", "w.npz", "--classifier", "c.npz", "--min-inside", "1.5"], "between 0 and 1"),
    (["convert", "--fully-conv", SMALL_A, "w.npz", "-o", "/nonexistent_dir/x"], "folder /nonexistent_dir"),
    (["compute_pca", "data/imagenette_32.npz", "--limit", "-5"], "--limit: must be at least 0"),
    (["train", "--solver", "s.prototxt", "--gpu", "-1"], "-gpu: must be at least 0"),
    (["train", "--solver", "s.prototxt", "-gpu", "all"], "start one rank per GPU: mpirun -np N vggcaffe train"),
])
def test_bad_numbers_and_paths_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_trailing_comma_in_weights_is_ignored(tmp_path, capsys):
    assert main(["train", "--solver", str(tmp_path / "none.prototxt"), "--weights", "a.npz,"]) == 1
    assert "none.prototxt" in capsys.readouterr().err          # the solver is read first; no '.' weights
