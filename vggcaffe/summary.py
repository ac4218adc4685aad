"""`vggcaffe summary`: a table of a net's layers with top shapes, parameters and multiply-adds."""
import numpy as np

from .prototxt import read_net


def layer_macs(layer, bottom, top):
    """Forward multiply-adds of one layer for its whole batch (convolution and inner product)."""
    if not layer.blobs or not top:
        return 0
    weight = layer.blobs[0]
    if layer.type == "Convolution":
        return top[0].count * int(np.prod(weight.shape[1:]))
    if layer.type == "InnerProduct":
        k = weight.shape[0] if layer.param.inner_product_param.transpose else weight.shape[1]
        return top[0].count * k
    return 0


def summarize(model, phase="TEST", batch=1):
    """Rows (name, type, top shape, params, MACs per image) and the totals."""
    from .net import Net
    param = read_net(model) if isinstance(model, str) else model
    for layer in param.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = batch
    net = Net(param, phase=phase, source=model)
    rows, seen = [], set()
    for name, layer, bottom, top in zip(net._layer_names, net.layers, net._bottoms, net._tops):
        if layer.type == "Split":
            continue
        params = sum(b.count for b in layer.blobs if id(b) not in seen)
        seen.update(id(b) for b in layer.blobs)
        shape = "x".join(str(d) for d in top[0].shape) if top else "-"
        per_image = top[0].shape[0] if top and top[0].shape else 1
        macs = layer_macs(layer, bottom, top) // per_image
        rows.append((name, layer.type, shape, params, macs))
    return rows, sum(r[3] for r in rows), sum(r[4] for r in rows)


def format_summary(rows, total_params, total_macs):
    header = ("layer", "type", "top shape", "params", "MACs")
    table = [header] + [(n, t, s, f"{p:,}", f"{m:,}") for n, t, s, p, m in rows]
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "-" * len(lines[0]))
    lines += [f"total params: {total_params}", f"total MACs: {total_macs}"]
    return "\n".join(lines)

