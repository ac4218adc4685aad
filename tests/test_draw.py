"""draw_net: the DOT graph of a net (layers, blobs, edges, phase filtering) and its rendering."""
import shutil

import pytest

from vggcaffe.cli import main

SMALL_A = "models/small/A_train_val.prototxt"


def test_dot_has_every_layer_blob_and_edge_of_the_phase(tmp_path):
    def layers(path):
        return [line for line in path.read_text().splitlines() if line.startswith("  layer") and "[" in line]
    for phase in ("TEST", "TRAIN", "ALL"):
        assert main(["draw_net", SMALL_A, str(tmp_path / f"{phase}.dot"), "--phase", phase]) == 0
    dot = (tmp_path / "TEST.dot").read_text()
    assert dot.startswith('digraph "VGG_A_small" {') and dot.rstrip().endswith("}")
    assert '"blob_data" -> layer1;' in dot and 'layer1 -> "blob_conv1_1";' in dot
    assert 'label="conv1_1\\n(Convolution)\\nkernel 3, stride 1, pad 1, 32 out"' in dot
    assert 'label="pool1\\n(Pooling)\\nMAX kernel 2, stride 2"' in dot
    assert "(Accuracy)" in dot and "(Accuracy)" not in (tmp_path / "TRAIN.dot").read_text()
    assert len(layers(tmp_path / "ALL.dot")) == len(layers(tmp_path / "TEST.dot")) + 1     # + TRAIN's data layer


@pytest.mark.skipif(shutil.which("dot") is not None, reason="Graphviz is installed here")
def test_an_image_without_graphviz_is_a_one_line_error(tmp_path, capsys):
    assert main(["draw_net", SMALL_A, str(tmp_path / "a.png")]) == 1
    assert "needs Graphviz's `dot` on the PATH" in capsys.readouterr().err
