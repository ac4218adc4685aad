"""The `vggcaffe` command line: train, test, time, summary and Caffe-style tools.

Every user error (bad prototxt, missing file, shape mismatch) is printed as one
line, `vggcaffe: error: ...`, with exit status 1 and no traceback.
"""
import argparse
import os
import sys
import traceback

from . import argtypes
from .errors import VggcaffeError


def cmd_summary(args):
    from .summary import format_summary, summarize
    rows, params, macs = summarize(args.model, phase=args.phase, batch=args.batch)
    print(format_summary(rows, params, macs))


def _set_mode(args, solver_param=None, comm=None):
    from . import backend
    gpu = args.gpu
    if gpu is None and solver_param is not None and solver_param.HasField("solver_mode") \
            and solver_param.solver_mode == solver_param.GPU:
        gpu = solver_param.device_id
    if gpu is not None:
        backend.set_mode_gpu()
        backend.set_device(comm.device_for(gpu) if comm else gpu)


def cmd_train(args):
    from .prototxt import read_solver
    from .solver import SGDSolver
    from .parallel import Communicator, launched_by_mpi
    comm = Communicator() if args.mpi or launched_by_mpi() else None
    if args.weights and args.snapshot:
        raise VggcaffeError("give either --weights (fine-tune) or --snapshot (resume), not both")
    param = read_solver(args.solver)
    if args.precision:
        param.precision = args.precision
    _set_mode(args, param, comm)
    solver = SGDSolver(param, comm=comm, level=args.level, stages=_stages(args), source=args.solver)
    if args.weights:
        for path in [w for w in args.weights.split(",") if w]:
            solver.net.copy_from(path)
        if comm:
            comm.broadcast_params(solver.net.learnable_params)
    solver.solve(resume_file=args.snapshot)


def cmd_test(args):
    import numpy as np
    from .log import log
    from .net import Net
    _set_mode(args)
    if args.dense or args.multi_crop:
        from .evaluate import run_test
        return run_test(args)
    if not args.model:
        raise VggcaffeError("test needs --model (it may be left out only with --dense or --multi-crop)")
    net = Net(args.model, phase=args.phase, weights=args.weights, level=args.level, stages=_stages(args))
    totals, loss = {}, 0.0
    for i in range(args.iterations):
        loss += net.forward_loss()
        for name in net.outputs:
            values = np.ravel(net.blobs[name].data)
            for k, v in enumerate(values):
                key = name if len(values) == 1 else f"{name}[{k}]"
                totals[key] = totals.get(key, 0.0) + float(v)
                log(f"Batch {i}, {key} = {float(v):.6g}")
    log(f"Loss: {loss / args.iterations:.6g}")
    for key, total in totals.items():
        w = net.blob_loss_weights.get(key, 0.0)
        mean = total / args.iterations
        suffix = f" (* {w:g} = {w * mean:.6g} loss)" if w else ""
        log(f"{key} = {mean:.6g}{suffix}")


def cmd_transfer(args):
    from .transfer import run_transfer
    _set_mode(args)
    run_transfer(args)


def cmd_localize(args):
    from .localize import run_localize
    _set_mode(args)
    run_localize(args)


def cmd_localize_net(args):
    from .localize import write_localisation_net
    net_path, solver_path = write_localisation_net(args)
    print(f"wrote {net_path} and {solver_path}; train with: vggcaffe train --solver {solver_path} "
          f"--weights <the classifier's weights>")


def cmd_compute_pca(args):
    from .data.image_io import load_image, read_listing
    from .data.sources import read_npz
    from .data.transforms import compute_pca, format_pca
    if args.source.endswith(".npz"):
        images, = read_npz(args.source, [f"x_{args.split}"], "compute_pca")
        images = images[:args.limit or None]
    else:
        paths, _, numbers = read_listing(args.source, args.root_folder)
        images = (load_image(path, listing=args.source, line=n)
                  for path, n in list(zip(paths, numbers))[:args.limit or None])
    eigval, eigvec = compute_pca(images)
    print(f"# RGB PCA of {args.source} (pixels 0..255); paste into transform_param with color_shift_std: 0.1")
    print(format_pca(eigval, eigvec))


def cmd_upgrade_net_proto_text(args):
    from .prototxt import read_net, write_text
    write_text(read_net(args.input), args.output)
    print(f"Wrote upgraded NetParameter text proto to {args.output}")


def cmd_upgrade_net_proto_binary(args):
    from .weights import upgrade_binary
    upgrade_binary(args.input, args.output)
    print(f"Wrote upgraded NetParameter binary proto to {args.output}")


def cmd_draw_net(args):
    from .draw import draw_net
    print(f"Drawing net to {draw_net(args.model, args.output, args.rankdir, args.phase)}")


def cmd_convert_imageset(args):
    from .data.db import convert_imageset
    from .log import log
    if args.backend != "lmdb":
        raise VggcaffeError("convert_imageset writes LMDB only (--backend lmdb); LevelDB has no maintained "
                            "Python binding")
    encode_type = (args.encode_type or "same") if args.encoded else ""
    convert_imageset(args.root_folder, args.listfile, args.db_name, args.resize_height, args.resize_width,
                     args.shuffle, args.gray, encode_type, log=log)


def cmd_compute_image_mean(args):
    from .data.db import compute_image_mean
    from .log import log
    compute_image_mean(args.input_db, args.output_file, log=log)


def cmd_convert(args):
    from .surgery import convert_files
    if not args.fully_conv:
        raise VggcaffeError("convert: give --fully-conv (the only conversion there is)")
    net_path, weights_path = convert_files(args.model, args.weights, args.output)
    print(f"wrote {net_path} and {weights_path}")


def cmd_time(args):
    from .timing import run_time
    _set_mode(args)
    run_time(args.model, args.iterations, args.batch, args.phase, args.precision)


def cmd_init_from_a(args):
    from .surgery import write_init_from_a
    pairs = write_init_from_a(args.source_model, args.source_weights, args.model, args.output,
                              args.conv, args.fc)
    for src, dst in pairs:
        print(f"{src} -> {dst}")
    print(f"wrote {args.output}: start training with --weights {args.output}")


def _stages(args):
    return [s for s in (args.stage or "").split(",") if s]


def _common(p):
    p.add_argument("--gpu", "-gpu", type=argtypes.gpu, default=None, help="run on this GPU (default: CPU)")
    p.add_argument("--level", "-level", type=int, default=0, help="net state level")
    p.add_argument("--stage", "-stage", default="", help="comma-separated net state stages")


def _evaluation_flags(p):
    """The paper's testing (section 3.2); any of --dense / --multi-crop selects it over --iterations."""
    p.add_argument("--dense", action="store_true", help="dense evaluation: the fully-convolutional net on whole images")
    p.add_argument("--multi-crop", action="store_true", help="grid x grid crops and their mirrors per scale")
    p.add_argument("--combine", action="store_true", help="also report dense + multi-crop (implies both)")
    p.add_argument("--flip", action="store_true", help="dense: average with the mirrored image's posteriors")
    p.add_argument("--scales", type=argtypes.sizes,
                   help="test scales Q, e.g. 256,384,512 (default: from the training scale S)")
    p.add_argument("--grid", type=argtypes.count(1), default=5,
                   help="multi-crop grid side (default 5: 50 crops per scale)")
    p.add_argument("--fuse", default="", help="more models to fuse: MODEL:WEIGHTS,... (MODEL may be empty)")
    p.add_argument("--source", help=".npz (x_<split>, y_<split>) or image listing (default: the TEST data layer's)")
    p.add_argument("--split", default=None, help="npz split (default: the data layer's, else test)")
    p.add_argument("--root-folder", default=None, help="prefix for listing paths")
    p.add_argument("--batch", type=argtypes.count(1), default=50, help="images per forward pass (default 50)")


def _precision_flag(p):
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None,
                   help="GPU math: fp32 (strict), tf32, bf16 (default: the solver's precision, else fp32)")


def build_parser():
    parser = argparse.ArgumentParser(prog="vggcaffe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="table of layers, top shapes, params and multiply-adds")
    p.add_argument("model", help="net prototxt")
    p.add_argument("--phase", default="TEST", choices=["TRAIN", "TEST"])
    p.add_argument("--batch", type=argtypes.count(1), default=1, help="batch size for the Input layer (default 1)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("train", help="train a net with a solver prototxt")
    p.add_argument("--solver", "-solver", required=True, help="solver prototxt")
    p.add_argument("--weights", "-weights", help="initial weights (.npz or .caffemodel; comma-separated)")
    p.add_argument("--snapshot", "-snapshot", help="resume from a .solverstate")
    p.add_argument("--mpi", action="store_true",
                   help="data-parallel over MPI ranks (implied when launched by mpirun with >1 rank)")
    _precision_flag(p)
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("test", help="score a model: run --iterations forward passes and average outputs")
    p.add_argument("--model", "-model", help="net prototxt (with --dense/--multi-crop: a train_val or deploy "
                   "net; left out, it is inferred from the weights, see vggcaffe/evaluate.py infer_model)")
    p.add_argument("--weights", "-weights", help="weights (.npz or .caffemodel)")
    p.add_argument("--iterations", "-iterations", type=argtypes.count(1), default=50)
    p.add_argument("--phase", "-phase", default="TEST", choices=["TRAIN", "TEST"])
    _evaluation_flags(p)
    _common(p)
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("time", help="Caffe's benchmark: average forward/backward ms per layer, totals, img/s")
    p.add_argument("--model", "-model", required=True, help="net prototxt (data layers become synthetic inputs)")
    p.add_argument("--iterations", "-iterations", type=argtypes.count(1), default=50)
    p.add_argument("--batch", type=argtypes.count(1), default=None,
                   help="batch size (default: the data or Input layer's)")
    p.add_argument("--phase", "-phase", default="TRAIN", choices=["TRAIN", "TEST"])
    _precision_flag(p)
    _common(p)
    p.set_defaults(func=cmd_time)

    p = sub.add_parser("convert", help="net surgery: --fully-conv turns fc layers into convolutions (dense testing)")
    p.add_argument("--fully-conv", action="store_true", help="fc6 -> kxk conv (k = pool5's size), fc7/fc8 -> 1x1")
    p.add_argument("model", help="deploy or train_val prototxt")
    p.add_argument("weights", help="its weights (.npz or .caffemodel)")
    p.add_argument("-o", "--output", type=argtypes.output_path, required=True,
                   help="writes OUTPUT.prototxt and OUTPUT.npz (or .caffemodel)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("init_from_a", help="the paper's pre-initialisation: net A's first conv and last fc "
                                           "layers placed into a deeper net")
    p.add_argument("--source-model", required=True, help="net A's prototxt (deploy or train_val)")
    p.add_argument("--source-weights", required=True, help="net A's trained weights (.npz or .caffemodel)")
    p.add_argument("--model", required=True, help="the deeper net's prototxt")
    p.add_argument("-o", "--output", type=argtypes.output_path, required=True, help="output .npz, for train --weights")
    p.add_argument("--conv", type=argtypes.count(0), default=4, help="how many of A's first conv layers (default 4)")
    p.add_argument("--fc", type=argtypes.count(0), default=3, help="how many of A's last fc layers (default 3)")
    p.set_defaults(func=cmd_init_from_a)

    p = sub.add_parser("transfer", help="appendix B: a trained net's descriptors of another dataset, "
                                        "a linear SVM, mean class recall")
    p.add_argument("--weights", "-weights", required=True, help="weights (.npz or .caffemodel)")
    p.add_argument("--model", "-model", help="train_val or deploy net (default: inferred from the weights)")
    p.add_argument("--source", required=True, help=".npz with x_train, y_train, x_test, y_test "
                   "(e.g. ../shared/data/transfer/caltech101_32.npz)")
    p.add_argument("--scales", type=argtypes.sizes,
                   help="image scales Q, e.g. 32,48,64 (default: the model's test scales)")
    p.add_argument("--aggregate", choices=["stack", "average"], default="stack",
                   help="combine the scales' descriptors by stacking (default) or averaging")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="do not average in the mirrored image")
    p.add_argument("--layer", help="descriptor blob (default: the bottom of the last InnerProduct, fc7)")
    p.add_argument("--fuse", default="", help="more models whose descriptors are stacked: MODEL:WEIGHTS,...")
    p.add_argument("--svm-c", type=argtypes.positive, default=None, help="the SVM's C (default: cross-validated)")
    p.add_argument("--features", type=argtypes.output_path, help="also write the descriptors to this .npz")
    p.add_argument("--batch", type=argtypes.count(1), default=50, help="images per forward pass (default 50)")
    _common(p)
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser("localize_net", help="appendix A: a box regression net (train_val and solver) made "
                                            "from a classification train_val")
    p.add_argument("--model", required=True, help="the classifier's train_val prototxt")
    p.add_argument("--source", required=True, help="box folder: boxes.tsv, <split>.txt (../shared/data/boxes)")
    p.add_argument("--scr", action="store_true", help="single-class regression (4 outputs; default: per-class)")
    p.add_argument("--finetune", choices=["all", "fc"], default="all",
                   help="fine-tune all layers (default) or only the fully-connected ones")
    p.add_argument("--scales", type=argtypes.sizes,
                   help="training scale S, or S_min,S_max to jitter (default: the classifier's)")
    p.add_argument("--batch", type=argtypes.count(1), default=32, help="training batch size (default 32)")
    p.add_argument("--max-iter", type=argtypes.count(1), default=1000, help="solver max_iter (default 1000)")
    p.add_argument("--base-lr", type=argtypes.positive, default=0.001,
                   help="solver base_lr (default 0.001, the paper's)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="val")
    p.add_argument("-o", "--output", type=argtypes.output_path, required=True,
                   help="writes OUTPUT_train_val.prototxt and OUTPUT_solver.prototxt")
    p.set_defaults(func=cmd_localize_net)

    p = sub.add_parser("localize", help="appendix A: localisation error of a box regressor (central crop; "
                                        "dense with greedy merging; top-5)")
    p.add_argument("--weights", "-weights", required=True, help="the regressor's weights")
    p.add_argument("--model", "-model", help="the regressor's train_val or deploy net (default: inferred)")
    p.add_argument("--classifier", required=True, help="the classification net's weights (class scores)")
    p.add_argument("--classifier-model", help="its train_val or deploy net (default: inferred)")
    p.add_argument("--source", help="box folder (default: the regressor's TEST data layer's)")
    p.add_argument("--split", default=None, help="split of the box folder (default: the TEST layer's, else val)")
    p.add_argument("--scales", type=argtypes.sizes, help="dense test scales Q (default: the training scale S)")
    p.add_argument("--merge-iou", type=argtypes.fraction, default=0.5,
                   help="greedy merging joins boxes overlapping this much")
    p.add_argument("--fuse", default="", help="more regressors whose boxes join the merge: MODEL:WEIGHTS,...")
    p.add_argument("--min-inside", type=argtypes.fraction, default=0.75,
                   help="dense: leave out locations whose window lies less than this fraction inside the image")
    _common(p)
    p.set_defaults(func=cmd_localize)

    for kind in ("text", "binary"):
        p = sub.add_parser(f"upgrade_net_proto_{kind}", help=f"Caffe's tool: an old-format {kind} net "
                           f"({'prototxt' if kind == 'text' else '.caffemodel'}: V1 layers, input_dim, ...) "
                           f"rewritten in the current format")
        p.add_argument("input")
        p.add_argument("output", type=argtypes.output_path)
        p.set_defaults(func=cmd_upgrade_net_proto_text if kind == "text" else cmd_upgrade_net_proto_binary)

    p = sub.add_parser("draw_net", help="Caffe's draw_net: the net as a Graphviz graph (.dot, or an image "
                                         "rendered by Graphviz's dot)")
    p.add_argument("model", help="net prototxt")
    p.add_argument("output", type=argtypes.output_path, help="OUTPUT.dot, or .png/.svg/.pdf (needs Graphviz)")
    p.add_argument("--rankdir", default="LR", choices=["LR", "TB", "BT", "RL"], help="direction of the graph")
    p.add_argument("--phase", default="ALL", choices=["TRAIN", "TEST", "ALL"], help="the layers of one phase")
    p.set_defaults(func=cmd_draw_net)

    p = sub.add_parser("convert_imageset", help="Caffe's tool: the images of a listing into an LMDB of "
                                                 "Datums (for the Data layer)")
    p.add_argument("root_folder", help="prefix of the listing's paths (e.g. images/)")
    p.add_argument("listfile", help="listing: '<path> <label>' per line")
    p.add_argument("db_name", type=argtypes.output_path, help="the LMDB folder to create")
    p.add_argument("--resize_height", "-resize_height", type=argtypes.count(0), default=0)
    p.add_argument("--resize_width", "-resize_width", type=argtypes.count(0), default=0)
    p.add_argument("--shuffle", "-shuffle", action="store_true", help="write the images in a random order")
    p.add_argument("--gray", "-gray", action="store_true", help="store greyscale images")
    p.add_argument("--encoded", "-encoded", action="store_true", help="store the images encoded (smaller)")
    p.add_argument("--encode_type", "-encode_type", choices=["jpg", "png"], default="",
                   help="with --encoded: jpg or png (default: each file's own type, its bytes kept "
                        "where no resize or grey conversion is asked)")
    p.add_argument("--backend", "-backend", default="lmdb", help="lmdb (the only one written)")
    p.set_defaults(func=cmd_convert_imageset)

    p = sub.add_parser("compute_image_mean", help="Caffe's tool: the mean image of an LMDB, for mean_file")
    p.add_argument("input_db", help="an LMDB of Datums (convert_imageset's output)")
    p.add_argument("output_file", nargs="?", type=argtypes.output_path, help="write the mean here (.binaryproto)")
    p.add_argument("--backend", "-backend", default="lmdb", choices=["lmdb"], help="lmdb (the only one read)")
    p.set_defaults(func=cmd_compute_image_mean)

    p = sub.add_parser("compute_pca", help="RGB eigenvalues/eigenvectors of a training set for the colour shift")
    p.add_argument("source", help=".npz (uint8 NHWC under x_<split>) or a Caffe image listing")
    p.add_argument("--split", default="train")
    p.add_argument("--root-folder", "-root_folder", default="", help="prefix for listing paths")
    p.add_argument("--limit", type=argtypes.count(0), default=0, help="use only the first N images (0 = all)")
    p.set_defaults(func=cmd_compute_pca)
    return parser


def main(argv=None):
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)    # results and stderr's log lines stay in order
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except VggcaffeError as e:
        _abort_ranks(str(e), 1)
        print(f"vggcaffe: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly.
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        _abort_ranks("interrupted", 130)
        print("vggcaffe: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        _abort_ranks(f"{type(e).__name__}: {e}", 1, traceback.format_exc())
        raise


def _abort_ranks(message, status, details=""):
    """Under MPI: print `message` with this rank and end every rank at once (no rank left waiting)."""
    from .parallel import abort_if_parallel
    abort_if_parallel(message, status, details)


if __name__ == "__main__":
    sys.exit(main())
