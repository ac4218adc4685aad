"""ClassSelect: each sample's group of outputs for its label (per-class box regression)."""
import numpy as np
import pytest

from tests.gradient_check import check_gradient, make_layer
from vggcaffe.errors import VggcaffeError

TEXT = 'name: "pick" type: "ClassSelect" class_select_param { group_size: %d }'


def test_forward_picks_the_labelled_group():
    x = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 12)          # 3 classes of 4
    labels = np.array([2.0, 0.0])
    layer, bottom, top = make_layer(TEXT % 4, [x, labels])
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, [x[0, 8:12], x[1, 0:4]])


def test_backward_writes_only_the_labelled_group():
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((5, 3 * 2, 1, 1)), np.array([0, 1, 2, 1, 0], np.float64)
    layer, bottom, top = make_layer(TEXT % 2, [x, labels])
    check_gradient(layer, bottom, top, check_bottom=[0])
    top[0].diff[...] = 1.0
    layer.backward(top, [True, False], bottom)
    mask = np.zeros((5, 3, 2))
    mask[np.arange(5), labels.astype(int)] = 1
    np.testing.assert_array_equal(bottom[0].diff.reshape(5, 3, 2), mask)


@pytest.mark.parametrize("labels, message", [([0, 3], r"outside \[0, 3\)"), ([-1, 0], "outside")])
def test_a_label_outside_the_classes_is_an_error(labels, message):
    layer, bottom, top = make_layer(TEXT % 4, [np.zeros((2, 12)), np.array(labels, np.float64)])
    with pytest.raises(VggcaffeError, match=f"'pick' \\(ClassSelect\\): a label is {message}"):
        layer.forward(bottom, top)


def test_shapes_are_checked():
    with pytest.raises(VggcaffeError, match="not whole groups of group_size 4"):
        make_layer(TEXT % 4, [np.zeros((2, 10)), np.zeros(2)])
    with pytest.raises(VggcaffeError, match="'labels'"):
        make_layer(TEXT % 4, [np.zeros((2, 8)), np.zeros(3)])
    with pytest.raises(VggcaffeError, match="group_size must be at least 1"):
        make_layer(TEXT % 0, [np.zeros((2, 8)), np.zeros(2)])
