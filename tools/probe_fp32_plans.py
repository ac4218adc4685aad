"""Probe cuDNN's strict-fp32 plans for VGG-16's 3x3 convolutions on the GPU.

For each layer shape and each of fprop / dgrad / wgrad, in strict fp32 (the
graph filter vggcaffe uses: tensor-core and down-converting engines
deselected), batch 64, channels-last or NCHW (--layouts): the time and
workspace of the plan that cuDNN's own build picks, then every plan of the
heuristic ranking in order, built and timed once (index:engine:workspace:ms,
or index:x where it does not build). It shows whether plan choice or layout
could close the fp32 gap (BENCHMARKS.md).

    python tools/probe_fp32_plans.py [--seconds 90] [--layers conv1_2 conv2_2 conv3_2] [--layouts nhwc nchw]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {  # x (N, C, H, W), w (K, C, 3, 3); y has x's spatial size (pad 1)
    "conv1_2": ((64, 64, 224, 224), (64, 64, 3, 3)),
    "conv2_2": ((64, 128, 112, 112), (128, 128, 3, 3)),
    "conv3_2": ((64, 256, 56, 56), (256, 256, 3, 3)),
    "conv4_2": ((64, 512, 28, 28), (512, 512, 3, 3)),
    "conv5_2": ((64, 512, 14, 14), (512, 512, 3, 3)),
}
WORKSPACE_MAX = 8 << 30      # plans needing more are listed, not run


def make_graph(kind, xs, ws, layout):
    """A strict-fp32 graph for one convolution pass in `layout`, and random operands for its tensors."""
    import cudnn
    import cupy
    from vggcaffe.gpu import cudnn_conv as cc
    f32 = cudnn.data_type.FLOAT

    def strides(shape):
        return cc._strides(shape, layout)
    ys = (xs[0], ws[0], xs[2], xs[3])
    g = cudnn.pygraph(io_data_type=f32, intermediate_data_type=f32, compute_data_type=f32,
                      handle=cc._device()["handle"])
    g.deselect_numeric_notes([cudnn.numerical_note.TENSOR_CORE, cudnn.numerical_note.DOWN_CONVERT_INPUTS])
    conv = dict(padding=[1, 1], stride=[1, 1], dilation=[1, 1], compute_data_type=f32)

    def tensor(name, shape):
        return g.tensor(name=name, dim=list(shape), stride=strides(shape), data_type=f32)
    if kind == "fprop":
        a, b = tensor("X", xs), tensor("W", ws)
        out, out_shape = g.conv_fprop(image=a, weight=b, **conv), ys
        shapes = {a: xs, b: ws}
    elif kind == "dgrad":
        a, b = tensor("DY", ys), tensor("W", ws)
        out, out_shape = g.conv_dgrad(loss=a, filter=b, **conv), xs
        shapes = {a: ys, b: ws}
    else:
        a, b = tensor("X", xs), tensor("DY", ys)
        out, out_shape = g.conv_wgrad(image=a, loss=b, **conv), ws
        shapes = {a: xs, b: ys}
    out.set_output(True).set_dim(list(out_shape)).set_stride(strides(out_shape)).set_data_type(f32)
    shapes[out] = out_shape
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    operands = {t: cupy.random.standard_normal(int(np.prod(s)), dtype=np.float32) for t, s in shapes.items()}
    return g, operands


def probe(kind, xs, ws, layout, deadline):
    import cupy
    from vggcaffe.gpu import cudnn_conv as cc
    handle, pool = cc._device()["handle"], cupy.get_default_memory_pool()
    g, operands = make_graph(kind, xs, ws, layout)
    pack = {t: a.data.ptr for t, a in operands.items()}
    g.build_plans()
    workspace = cupy.empty(max(int(g.get_workspace_size()), 1), np.uint8)
    pick = cc._elapsed_ms(lambda: g.execute(pack, workspace.data.ptr, handle=handle), repeats=2)
    line = f"build_plans() pick {pick:.2f} ms, workspace {workspace.nbytes >> 20} MiB;"
    del workspace
    g, operands = make_graph(kind, xs, ws, layout)
    pack = {t: a.data.ptr for t, a in operands.items()}
    rows = []
    for index in range(int(g.get_execution_plan_count())):
        if time.time() > deadline:
            rows.append("(time up)")
            break
        try:
            g.build_plan_at_index(index)
            need = int(g.get_workspace_size_plan_at_index(index))
        except Exception:  # cuDNN refuses plans with several exception types
            rows.append(f"{index}:x")
            continue
        name = g.get_plan_name_at_index(index)
        if need > WORKSPACE_MAX:
            rows.append(f"{index}:{name}:{need >> 20}M:not run")
            continue
        buf = cupy.empty(max(need, 1), np.uint8)
        ms = cc._elapsed_ms(lambda: g.execute_plan_at_index(pack, buf.data.ptr, index=index, handle=handle),
                            repeats=1)
        rows.append(f"{index}:{name}:{need >> 20}M:{ms:.2f}ms")
        del buf
        pool.free_all_blocks()
    return f"{line} {len(rows)} ranked plans: " + " ".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=90, help="stop probing after this long")
    ap.add_argument("--layers", nargs="+", default=["conv1_2", "conv2_2", "conv3_2"], choices=list(SHAPES))
    ap.add_argument("--layouts", nargs="+", default=["nhwc"], choices=["nhwc", "nchw"])
    args = ap.parse_args(argv)
    from vggcaffe import backend
    from vggcaffe.gpu import set_precision
    backend.set_mode_gpu()
    set_precision("fp32")
    deadline = time.time() + args.seconds
    for name in args.layers:
        for layout in args.layouts:
            for kind in ("fprop", "dgrad", "wgrad"):
                if time.time() > deadline:
                    return
                print(f"{name} {layout} {kind}: {probe(kind, *SHAPES[name], layout, deadline)}", flush=True)


if __name__ == "__main__":
    main()
