"""`vggcaffe time` on the CPU: synthetic inputs in place of data layers, Caffe's table."""
from pathlib import Path

import numpy as np

from vggcaffe.cli import main
from vggcaffe.net import Net
from vggcaffe.timing import fill_inputs, synthetic_net

SMALL_A = str(Path(__file__).parent.parent / "models" / "small" / "A_train_val.prototxt")


def test_synthetic_net_replaces_data_layers_with_inputs():
    param = synthetic_net(SMALL_A, batch=3)
    data = [lp for lp in param.layer if lp.name == "data"]
    assert data and all(lp.type == "Input" for lp in data)
    assert [list(s.dim) for s in data[0].input_param.shape] == [[3, 3, 32, 32], [3]]
    net = Net(param, phase="TRAIN")
    fill_inputs(net)
    labels = net.blobs["label"].data
    assert net.blobs["data"].data.std() > 0.5
    assert labels.min() >= 0 and labels.max() < 10 and np.all(labels == np.round(labels))


def test_time_prints_caffe_table(capsys):
    assert main(["time", "--model", SMALL_A, "--iterations", "1", "--batch", "2"]) == 0
    out = capsys.readouterr().err                      # logged, as Caffe's time logs it
    for line in ("Average time per layer:", "conv1_1\tforward:", "conv1_1\tbackward:", "Average Forward pass:",
                 "Average Backward pass:", "Average Forward-Backward:", "Total Time:", "img/s (batch 2)"):
        assert line in out, line


def test_data_layers_without_crop_size_are_timed_at_their_sources_size(tmp_path, capsys):
    from vggcaffe.proto import caffe_pb2
    from vggcaffe.prototxt import parse_text
    np.savez(tmp_path / "set.npz", x_train=np.zeros((2, 20, 24, 3), np.uint8), y_train=np.zeros(2, np.int64))
    text = (f'layer {{ name: "d" type: "NpzData" top: "data" top: "label" '
            f'npz_data_param {{ source: "{tmp_path / "set.npz"}" batch_size: 5 }} }}\n'
            'layer { name: "m" type: "MemoryData" top: "m" top: "ml" '
            'memory_data_param { batch_size: 4 channels: 2 height: 3 width: 5 } }\n'
            'layer { name: "gone" type: "NpzData" top: "g" top: "gl" npz_data_param { source: "/nowhere.npz" } }')
    param = synthetic_net(parse_text(text, caffe_pb2.NetParameter()), crop=16)
    shapes = [[list(s.dim) for s in lp.input_param.shape] for lp in param.layer]
    assert shapes == [[[5, 3, 20, 24], [5]], [[4, 2, 3, 5], [4]], [[1, 3, 16, 16], [1]]]
    assert "data layer 'gone' has no crop_size and its source cannot be read" in capsys.readouterr().err
