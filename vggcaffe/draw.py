"""`vggcaffe draw_net`: a net as a Graphviz graph, as Caffe's python/draw_net.py draws it.

Layers are boxes (name, type and the settings that shape them: kernel, stride,
pad, outputs), blobs are octagons, edges run bottom -> layer -> top; an in-place
layer points back at the blob it changes. The DOT text is written by hand (no
pydot); a .dot output is that text, any other extension (png, svg, pdf) is
rendered by Graphviz's `dot`, which must be on the PATH.
"""
import shutil
import subprocess
from pathlib import Path

from .errors import VggcaffeError
from .graph import PHASES, filter_net
from .proto import caffe_pb2
from .prototxt import read_net

COLOURS = {"Convolution": "#FF5050", "Pooling": "#FF9900", "InnerProduct": "#CC33FF"}


def _quote(text):
    """A DOT string: backslashes and quotes escaped, newlines as DOT's \\n."""
    escaped = str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped + '"'


def _details(lp):
    """The settings that shape a layer's output, one short line."""
    if lp.type == "Convolution":
        c = lp.convolution_param
        k = list(c.kernel_size) or [c.kernel_h]
        parts = [f"kernel {k[0]}", f"stride {(list(c.stride) or [c.stride_h or 1])[0]}",
                 f"pad {(list(c.pad) or [c.pad_h])[0]}", f"{c.num_output} out"]
        return ", ".join(parts)
    if lp.type == "Pooling":
        p = lp.pooling_param
        kind = caffe_pb2.PoolingParameter.PoolMethod.Name(p.pool)
        return f"{kind} kernel {p.kernel_size or p.kernel_h}, stride {p.stride_h or p.stride}"
    if lp.type == "InnerProduct":
        return f"{lp.inner_product_param.num_output} out"
    return ""


def net_to_dot(param, rankdir="LR"):
    """DOT text of a NetParameter (already filtered to one phase, or all layers)."""
    lines = [f"digraph {_quote(param.name or 'net')} {{", f"  rankdir={rankdir};",
             '  node [fontname="Helvetica", fontsize=10];']
    blobs = set()
    for i, lp in enumerate(param.layer):
        label = "\n".join(x for x in (lp.name, f"({lp.type})", _details(lp)) if x)
        colour = COLOURS.get(lp.type, "#6495ED")
        lines.append(f'  layer{i} [shape=box, style=filled, fillcolor="{colour}", label={_quote(label)}];')
        for name in list(lp.bottom) + list(lp.top):
            if name not in blobs:
                blobs.add(name)
                lines.append(f'  {_quote("blob_" + name)} [shape=octagon, style=filled, fillcolor="#E0E0E0", '
                             f"label={_quote(name)}];")
        for name in lp.bottom:
            lines.append(f'  {_quote("blob_" + name)} -> layer{i};')
        for name in lp.top:
            lines.append(f'  layer{i} -> {_quote("blob_" + name)};')
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_net(model, output, rankdir="LR", phase="ALL"):
    """Write `output`: DOT text for .dot, else the image Graphviz renders from it."""
    param = read_net(model)
    if phase != "ALL":
        param = filter_net(param, caffe_pb2.NetState(phase=PHASES[phase]))
    dot = net_to_dot(param, rankdir)
    output = Path(output)
    if output.suffix == ".dot":
        output.write_text(dot)
        return output
    program = shutil.which("dot")
    if program is None:
        raise VggcaffeError(f"rendering {output.suffix or 'an image'} needs Graphviz's `dot` on the PATH; "
                            f"write a .dot file instead and render it elsewhere")
    result = subprocess.run([program, f"-T{output.suffix.lstrip('.') or 'png'}", "-o", str(output)],
                            input=dot, text=True, capture_output=True)
    if result.returncode:
        raise VggcaffeError(f"Graphviz could not draw {output}: {result.stderr.strip()[:300]}")
    return output
