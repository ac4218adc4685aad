"""Object localisation as in the paper's appendix A: box regression, dense application, greedy merging.

Training. A classification net becomes a box regressor (`localisation_net`):
its last InnerProduct is replaced by `fc8_loc`, randomly initialised, which
predicts a box as (centre x, centre y, width, height) relative to the input
crop (divided by the crop size): 4 outputs shared by all classes (single-class
regression, SCR) or 4 per class (per-class regression, PCR, whose ClassSelect
layer keeps the ground-truth class's 4 for the loss). The loss is Euclidean.
The rest of the net starts from the classification weights (`--weights`, by
layer name) and is fine-tuned whole, or only its fully-connected layers. The
images come from the `BoxData` Python layer of vggcaffe.boxes: an ImageNet box
folder (boxes.tsv, <split>.txt: see ../shared/data/boxes/README.md), each image
rescaled so its smaller side is S, a random crop-size window (the centre one
at TEST) and a random mirror; the target is the ground-truth box of the
image's class with the largest area inside the window, whole: where it
reaches beyond the window, so does the target (values outside [0, 1]), so
that every window of a dense application predicts the whole object.

Testing (`evaluate_localisation`, `vggcaffe localize`), a box is correct when
its IoU with one of the image's ground-truth boxes is at least 0.5:
  central crop  the box of the ground-truth class predicted from the centre
                crop of the image at scale S (the paper's comparison of
                settings, its Table 8);
  dense         the regression net made fully convolutional (as in dense
                testing) runs over the whole image at each scale Q; every
                location of its output map predicts a box per class for the
                window it sees (the crop-size window at the map's stride: 32
                pixels in VGG; windows less than 75% inside the image, which
                ceil-mode pooling adds at the far edges, are left out). A
                class's boxes of all locations and scales are merged greedily
                (after Sermanet et al.'s OverFeat): while two boxes overlap by
                IoU >= merge_iou, the most overlapping pair is replaced by
                their average weighted by their class scores, which add up;
                the class's box is then the one with the highest score.
                The class score of a box is the classification net's posterior
                at that location (the same location of its own dense map when
                the maps have one shape, else its posterior for the whole image
                at that scale). Several regressors (`--fuse`) pool their boxes
                before merging, as the paper combines nets (their centre-crop
                boxes are merged the same way, with equal weights). Reported
                for the ground-truth class, and as the
                ILSVRC localisation error: the classifier's top-5 classes each
                with its box, wrong unless one is the right class with a right box.
  whole image   the baseline of answering every image with its full frame.
"""
import json
from pathlib import Path

import numpy as np

from . import backend
from .boxes import BoxSet, decode, iou, merge_boxes
from .errors import VggcaffeError
from .evaluate import Model, fuse_spec, infer_model
from .proto import caffe_pb2
from .prototxt import read_net, upgrade_net
from .surgery import deploy_from_train_val, test_data_layer, train_data_layer

# ------------------------------------------------------------------ nets

def _python_layer(layer, name, module_class, tops, param_str, bottoms=()):
    layer.name, layer.type = name, "Python"
    layer.top.extend(tops)
    layer.bottom.extend(bottoms)
    layer.python_param.module, layer.python_param.layer = "vggcaffe.boxes", module_class
    layer.python_param.param_str = json.dumps(param_str)
    return layer


def localisation_net(classifier, source, per_class=True, finetune="all", batch_size=32, test_batch_size=None,
                     train_split="train", test_split="val", scales=None):
    """The train_val NetParameter of the box regressor made from a classification
    train_val: BoxData layers in place of its data layers (their transform, S from the
    TRAIN layer's scale range or the crop size), `fc8_loc` in place of its last
    InnerProduct, a ClassSelect for PCR, a EuclideanLoss, and at TEST a BoxAccuracy.
    finetune: "all" layers, or "fc" (convolutions frozen, lr_mult 0). scales: the training
    scale range (S_min, S_max) when not the classifier's."""
    if finetune not in ("all", "fc"):
        raise VggcaffeError(f"finetune is 'all' or 'fc', got {finetune!r}")
    param = upgrade_net(read_net(classifier) if isinstance(classifier, (str, Path)) else classifier)
    train, test = train_data_layer(param), test_data_layer(param)
    if train is None or test is None:
        raise VggcaffeError(f"net '{param.name}' needs a TRAIN and a TEST data layer")
    ips = [lp for lp in param.layer if lp.type == "InnerProduct"]
    if not ips:
        raise VggcaffeError(f"net '{param.name}' has no InnerProduct layer to turn into a box regressor")
    last, classes = ips[-1], ips[-1].inner_product_param.num_output
    if len(last.top) != 1:
        raise VggcaffeError(f"layer '{last.name}' must have one top")
    labels = set(train.top[1:]) | set(test.top[1:])
    net = caffe_pb2.NetParameter(name=f"{param.name}_loc_{'pcr' if per_class else 'scr'}_{finetune}")
    tops = [train.top[0], "label", "box"] if per_class else [train.top[0], "box"]
    for layer, phase, split, batch in ((train, caffe_pb2.TRAIN, train_split, batch_size),
                                       (test, caffe_pb2.TEST, test_split, test_batch_size or batch_size)):
        data = _python_layer(net.layer.add(), "data", "BoxData", tops,
                             {"source": str(source), "split": split, "batch_size": batch})
        data.include.add(phase=phase)
        t = data.transform_param
        t.CopyFrom(layer.transform_param)
        for field in ("crop_pad", "color_shift_std", "pca_eigval", "pca_eigvec", "scale_min", "scale_max"):
            t.ClearField(field)
        lo, hi = scales or (train.transform_param.scale_min, train.transform_param.scale_max)
        if lo:
            t.scale_min, t.scale_max = lo, hi or lo
    data_layers = {train.name, test.name}
    for lp in param.layer:
        if lp.name in data_layers or labels & set(lp.bottom) or last.top[0] in lp.bottom:
            continue
        if lp.name == last.name:
            fc = net.layer.add(name="fc8_loc", type="InnerProduct", bottom=list(lp.bottom), top=["fc8_loc"])
            fc.param.add(lr_mult=1, decay_mult=1)
            fc.param.add(lr_mult=2, decay_mult=0)
            fc.inner_product_param.num_output = 4 * classes if per_class else 4
            fc.inner_product_param.weight_filler.type, fc.inner_product_param.weight_filler.std = "gaussian", 0.001
            fc.inner_product_param.bias_filler.type = "constant"
            continue
        layer = net.layer.add()
        layer.CopyFrom(lp)
        if finetune == "fc" and lp.type == "Convolution":
            del layer.param[:]
            for _ in range(2 if lp.convolution_param.bias_term else 1):
                layer.param.add(lr_mult=0, decay_mult=0)
    prediction = "fc8_loc"
    if per_class:
        select = net.layer.add(name="box_pred", type="ClassSelect", bottom=["fc8_loc", "label"], top=["box_pred"])
        select.class_select_param.group_size = 4
        prediction = "box_pred"
    net.layer.add(name="loss", type="EuclideanLoss", bottom=[prediction, "box"], top=["loss"])
    accuracy = _python_layer(net.layer.add(), "box_accuracy", "BoxAccuracy", ["box_accuracy"], {"threshold": 0.5},
                             bottoms=[prediction, "box"])
    accuracy.include.add(phase=caffe_pb2.TEST)
    return net


def localisation_solver(net_path, prefix, max_iter=1000, base_lr=0.001, test_iter=2, test_interval=100):
    """The SolverParameter for a regressor: SGD with momentum 0.9, weight decay 5e-4 and the
    paper's learning rate of 1e-3 for localisation, divided by 10 at 70% of max_iter."""
    return caffe_pb2.SolverParameter(
        net=str(net_path), base_lr=base_lr, lr_policy="multistep", gamma=0.1, stepvalue=[int(0.7 * max_iter)],
        momentum=0.9, weight_decay=0.0005, max_iter=max_iter, test_iter=[test_iter], test_interval=test_interval,
        display=max(1, test_interval // 2), average_loss=max(1, test_interval // 2), snapshot=0,
        snapshot_prefix=str(prefix), solver_mode=caffe_pb2.SolverParameter.CPU, random_seed=1701)


def write_localisation_net(args):
    """`vggcaffe localize_net`: write OUTPUT_train_val.prototxt and OUTPUT_solver.prototxt."""
    from google.protobuf import text_format
    boxes = BoxSet(args.source, args.test_split)
    test_iter = -(-len(boxes) // (4 * args.batch))            # every test image once (a few twice at most)
    test_batch = -(-len(boxes) // test_iter)
    net = localisation_net(args.model, args.source, per_class=not args.scr, finetune=args.finetune,
                           batch_size=args.batch, test_batch_size=test_batch, train_split=args.train_split,
                           test_split=args.test_split, scales=args.scales and _scale_range(args.scales))
    out = Path(args.output)
    net_path, solver_path = Path(f"{out}_train_val.prototxt"), Path(f"{out}_solver.prototxt")
    solver = localisation_solver(net_path, Path("snapshots") / out.name, args.max_iter, args.base_lr,
                                 test_iter=test_iter)
    head = (f"# Written by `vggcaffe localize_net` from {args.model}: a box regressor "
            f"({'SCR' if args.scr else 'PCR'}, fine-tuning {args.finetune} layers), the paper's appendix A.\n")
    for path, message in ((net_path, net), (solver_path, solver)):
        path.write_text(head + text_format.MessageToString(message))
    return net_path, solver_path


def _scale_range(sizes):
    if len(sizes) not in (1, 2) or sizes[0] > sizes[-1]:
        raise VggcaffeError(f"--scales takes S or S_min,S_max, got {','.join(map(str, sizes))}")
    return sizes[0], sizes[-1]


def total_stride(deploy):
    """The product of the strides of the convolutions and pools before the first InnerProduct."""
    stride = 1
    for lp in deploy.layer:
        if lp.type == "InnerProduct":
            break
        if lp.type == "Convolution":
            c = lp.convolution_param
            stride *= c.stride_h or (c.stride[0] if c.stride else 1)
        elif lp.type == "Pooling":
            stride *= lp.pooling_param.stride_h or lp.pooling_param.stride
    return stride


# ------------------------------------------------------------------ testing

class Localiser:
    """A trained box regressor (its train_val, or a deploy net ending in the box outputs) with
    its weights, as a crop net and a fully-convolutional net; `groups` boxes of 4 outputs
    (one per class for PCR, 1 for SCR)."""

    def __init__(self, model, weights):
        param = upgrade_net(read_net(model) if isinstance(model, (str, Path)) else model)
        train_val = test_data_layer(param) is not None
        deploy = deploy_from_train_val(param, prob=False) if train_val else param
        self.model = Model(deploy, weights, name=Path(str(weights)).stem)
        self.stride = total_stride(deploy)
        outputs = self.model.fc_net.blobs[self.model.output].count // self.model.fc_net.blobs[self.model.input].num
        if outputs % 4:
            raise VggcaffeError(f"{model}: output '{self.model.output}' has {outputs} values, not boxes of 4")
        self.groups = outputs // 4
        train = train_data_layer(param) if train_val else None
        t = train.transform_param if train is not None else self.model.transform
        self.train_scale = (t.scale_min + (t.scale_max or t.scale_min)) // 2 or self.model.crop

    def boxes_of(self, out, classes):
        """(N, ..., 4) encoded boxes for `classes` (N,) from outputs (N, 4 * groups, ...)."""
        out = out.reshape(out.shape[0], self.groups, 4, *out.shape[2:])
        pick = np.zeros_like(classes) if self.groups == 1 else classes
        return np.moveaxis(out[np.arange(len(classes)), pick], 1, -1)

    def central(self, image, label):
        """The box (corners, image pixels) of class `label` from the centre crop at the training scale."""
        x = self.model.prepare(image[None], self.train_scale)
        h, w = x.shape[2:]
        crop = self.model.crop
        r, c = (h - crop) // 2, (w - crop) // 2
        window = np.ascontiguousarray(x[:, :, r:r + crop, c:c + crop])
        out = backend.to_numpy(self.model.fc_net.forward(**{self.model.input: window})[self.model.output])
        box = decode(self.boxes_of(out.astype(np.float64), np.array([label]))[0], crop) + [c, r, c, r]
        return _to_image(box, image.shape, (h, w))

    def dense(self, image, q):
        """At scale q: (boxes (groups, h, w, 4) in image pixels, inside (h, w)), the box every
        location predicts for its window, and the fraction of that window inside the image
        (below 1 where ceil-mode pooling adds a location whose window hangs over the edge)."""
        x = self.model.prepare(image[None], q)
        out = backend.to_numpy(self.model.conv_net.forward(**{self.model.input: x})[self.model.output])
        out = out[0].astype(np.float64).reshape(self.groups, 4, *out.shape[2:])
        h, w = out.shape[2:]
        t = np.moveaxis(out, 1, -1)                                           # (groups, h, w, 4)
        rows, cols = np.meshgrid(np.arange(h) * self.stride, np.arange(w) * self.stride, indexing="ij")
        boxes = decode(t, self.model.crop) + np.stack([cols, rows, cols, rows], axis=-1)
        crop, (sh, sw) = self.model.crop, x.shape[2:]
        inside = (np.clip(sh - rows, 0, crop) / crop) * (np.clip(sw - cols, 0, crop) / crop)
        return _to_image(boxes, image.shape, (sh, sw)), inside


def _to_image(boxes, image_shape, scaled_shape):
    """Boxes in the pixels of the rescaled image -> the original image's, clipped to it."""
    (h, w), (sh, sw) = image_shape[:2], scaled_shape
    out = boxes * [w / sw, h / sh, w / sw, h / sh]
    return np.clip(out, 0, [w, h, w, h])


def _correct(box, truth, threshold=0.5):
    return bool(iou(box, truth).max() >= threshold)


def evaluate_localisation(localisers, classifier, boxes, scales=None, merge_iou=0.5, top_k=5, min_inside=0.75):
    """{method: error} over a BoxSet (see the module docstring) of one Localiser or several,
    whose boxes are pooled before merging (the paper's combination of nets); the classifier
    is an evaluate.Model (its dense posteriors give the top-k classes and the boxes'
    scores). Locations whose window lies less than `min_inside` inside the image are left out."""
    if not 0 <= min_inside <= 1:
        raise VggcaffeError(f"min_inside is a fraction of a window, 0..1; got {min_inside}")
    localisers = localisers if isinstance(localisers, (list, tuple)) else [localisers]
    scales = scales or [localisers[0].train_scale]
    counts = dict.fromkeys(("whole image", "central crop, ground-truth class", "dense, ground-truth class",
                            f"dense, top-{top_k} classes", f"classification top-{top_k}"), 0)
    for image, label, truth in zip(boxes.images, boxes.labels, boxes.boxes):
        h, w = image.shape[:2]
        counts["whole image"] += not _correct([0, 0, w, h], truth)
        central = np.stack([loc.central(image, label) for loc in localisers])
        counts["central crop, ground-truth class"] += not _correct(merge_boxes(central, np.ones(len(central)),
                                                                               merge_iou)[0][0], truth)
        found, image_probs = [], 0.0
        for q in scales:
            prob = backend.to_numpy(classifier.conv_net.forward(
                **{classifier.input: classifier.prepare(image[None], q)})[classifier.output])[0].astype(np.float64)
            mean = prob.reshape(prob.shape[0], -1).mean(axis=1)
            image_probs = image_probs + mean / len(scales)
            for loc in localisers:
                box_map, inside = loc.dense(image, q)
                keep = inside >= min_inside
                at = prob if prob.shape[1:] == inside.shape else np.broadcast_to(mean[:, None, None],
                                                                                  (len(mean), *inside.shape))
                found.append((box_map[:, keep], at[:, keep]))
        ranked = np.argsort(-image_probs, kind="stable")[:top_k]
        classes = {int(c) for c in ranked} | {int(label)}
        merged = {c: _class_box(found, c, merge_iou) for c in classes}
        counts["dense, ground-truth class"] += not _correct(merged[int(label)], truth)
        counts[f"dense, top-{top_k} classes"] += not any(c == label and _correct(merged[int(c)], truth) for c in ranked)
        counts[f"classification top-{top_k}"] += label not in ranked
    return {method: n / len(boxes) for method, n in counts.items()}


def _class_box(found, c, merge_iou):
    """Class c's merged box from every (boxes (groups, k, 4), scores (C, k)) found: one group
    for SCR, one per class for PCR."""
    boxes = np.concatenate([b[0 if len(b) == 1 else c] for b, _ in found])
    weights = np.concatenate([s[c] for _, s in found])
    return merge_boxes(boxes, weights, merge_iou)[0][0]


def run_localize(args):
    """`vggcaffe localize`: the localisation errors of a trained regressor on a box folder split."""
    from .log import log
    model = args.model or infer_model(args.weights)
    localisers = [Localiser(model, args.weights)]
    for more, weights in (fuse_spec(s) for s in args.fuse.split(",") if s):
        localisers.append(Localiser(more or infer_model(weights), weights))
    localiser = localisers[0]
    classifier = Model(args.classifier_model or infer_model(args.classifier), args.classifier)
    source, split = args.source, args.split
    if source is None:
        layer = test_data_layer(upgrade_net(read_net(model)))
        try:
            given = json.loads(layer.python_param.param_str) if layer is not None and layer.type == "Python" else {}
        except json.JSONDecodeError:
            given = {}
        if not isinstance(given, dict) or "source" not in given:
            raise VggcaffeError(f"give --source: the TEST data layer of {model} names no box folder")
        source, split = given["source"], split or given.get("split", "val")
    boxes = BoxSet(source, split or "val")
    scales = args.scales
    for loc in localisers:
        log(f"{loc.model.name}: {'PCR' if loc.groups > 1 else 'SCR'}, crop {loc.model.crop}, S = {loc.train_scale}")
    log(f"dense Q = {', '.join(map(str, scales or [localiser.train_scale]))}; classifier {classifier.name}; "
        f"{len(boxes)} images of {source} ({boxes.split})")
    errors = evaluate_localisation(localisers, classifier, boxes, scales, args.merge_iou, min_inside=args.min_inside)
    width = max(map(len, errors))
    print(f"{'method':<{width}}    error")
    for method, error in errors.items():
        print(f"{method:<{width}}  {100 * error:6.2f}%")
