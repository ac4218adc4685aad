"""Very deep features on other datasets (the paper's appendix B): descriptors + a linear SVM.

A net trained on ImageNet (here: on the shipped Imagenette) is used as a fixed
feature extractor, with no fine-tuning:

  descriptor   the penultimate layer (fc7: 4096-d in VGG-16, the bottom of the
               last InnerProduct) of the fully-convolutional net (as in dense
               testing, vggcaffe/surgery.py) applied to the whole image rescaled
               so its smaller side is Q, global-average-pooled over the map's
               locations, and averaged with the mirrored image's descriptor;
  scales       several Q either stacked (concatenated, the paper's choice for
               Caltech) or averaged (its choice for VOC);
  normalised   the model's descriptor is L2-normalised; fusing models stacks
               their normalised descriptors (divided by sqrt(#models), so the
               result has unit norm too), the paper's "late fusion" of D and E;
  classifier   a linear SVM per class (one-vs-rest; scikit-learn's LinearSVC,
               squared hinge loss), its C chosen by cross-validation on the
               training set unless given;
  metric       mean class recall (the paper's measure on Caltech-101/256),
               with overall accuracy beside it.
"""
from pathlib import Path

import numpy as np

from . import backend
from .errors import VggcaffeError
from .evaluate import ImageSet, Model, fuse_spec, infer_model
from .prototxt import read_net
from .surgery import deploy_from_train_val, is_deploy

AGGREGATES = ("stack", "average")
C_GRID = (0.1, 1.0, 10.0, 100.0)


def penultimate_blob(deploy):
    """The blob the last InnerProduct reads (fc7 in VGG): the paper's image descriptor."""
    ips = [lp for lp in deploy.layer if lp.type in ("InnerProduct", "INNER_PRODUCT")]
    if not ips:
        raise VggcaffeError(f"net '{deploy.name}' has no InnerProduct layer; give --layer")
    return ips[-1].bottom[0]


class FeatureModel(Model):
    """A model under test that also keeps one intermediate blob of its fully-convolutional net."""

    def __init__(self, model, weights, layer=None, name=None, dtype=np.float32):
        param = read_net(model) if isinstance(model, (str, Path)) else model
        deploy = param if is_deploy(param) else deploy_from_train_val(param)
        self.layer = layer or penultimate_blob(deploy)
        tops = list(dict.fromkeys(top for lp in deploy.layer for top in lp.top))
        if self.layer not in tops:
            raise VggcaffeError(f"{model}: the net has no blob '{self.layer}'; its blobs are {', '.join(tops)}")
        super().__init__(deploy, weights, dtype=dtype, name=name or Path(str(weights)).stem, keep=[self.layer])

    def pooled(self, x):
        """(N, D): the feature map of images x (N, C, H, W), averaged over its locations."""
        self.conv_net.forward(**{self.input: x})
        feat = backend.to_numpy(self.conv_net.blobs[self.layer].data).astype(np.float64)
        return feat.reshape(feat.shape[0], feat.shape[1], -1).mean(axis=2)

    def describe(self, images, scales, flip=True, aggregate="stack"):
        """(N, D * len(scales)) stacked or (N, D) averaged, L2-normalised descriptors of
        images (N, H, W, C) uint8 of one size."""
        if aggregate not in AGGREGATES:
            raise VggcaffeError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        per_scale = []
        for q in scales:
            x = self.prepare(images, q)
            d = self.pooled(x)
            if flip:
                d = (d + self.pooled(np.ascontiguousarray(x[..., ::-1]))) / 2
            per_scale.append(d)
        d = np.concatenate(per_scale, axis=1) if aggregate == "stack" else np.mean(per_scale, axis=0)
        return l2_normalise(d)


def l2_normalise(d):
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    return d / np.maximum(norm, 1e-12)


def descriptors(models, images, scales=None, flip=True, aggregate="stack", batch=50):
    """(N, D) descriptors of an ImageSet: each model's, stacked when there are several
    (late fusion), scaled to unit norm. scales: one list of Q for all models, or None for
    each model's default test scales."""
    parts = [[] for _ in models]
    for _, chunk in images.chunks(batch):
        for part, model in zip(parts, models):
            part.append(model.describe(chunk, scales or model.scales, flip, aggregate))
    d = np.concatenate([np.concatenate(p) for p in parts], axis=1)
    return d / np.sqrt(len(models))


def mean_class_recall(labels, predicted):
    """The mean over classes of the fraction of that class's samples predicted right."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    return float(np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)]))


def fit_svm(features, labels, c=None, folds=3, seed=0):
    """A one-vs-rest linear SVM; C by `folds`-fold stratified cross-validation over C_GRID
    (mean class recall; the fits run on all cores) when not given. Returns (classifier,
    C, {C: cv score})."""
    try:
        from sklearn.model_selection import GridSearchCV, StratifiedKFold
        from sklearn.svm import LinearSVC
    except ImportError:
        raise VggcaffeError("the linear SVM needs scikit-learn: pip install -e '.[svm]'") from None
    scores = {}
    if c is None:
        counts = np.bincount(labels)
        folds = min(folds, int(counts[counts > 0].min()))
        if folds < 2:
            raise VggcaffeError("choosing C by cross-validation needs 2 training images of every class; give --svm-c")
        search = GridSearchCV(LinearSVC(), {"C": list(C_GRID)}, scoring="balanced_accuracy", refit=False,
                              cv=StratifiedKFold(folds, shuffle=True, random_state=seed), n_jobs=-1)
        search.fit(features, labels)
        results = search.cv_results_
        scores = {p["C"]: float(m) for p, m in zip(results["params"], results["mean_test_score"])}
        c = max(scores, key=scores.get)
    return LinearSVC(C=c).fit(features, labels), c, scores


def run_transfer(args):
    """`vggcaffe transfer`: descriptors of the train and test images of --source, an SVM on
    the first, mean class recall on the second."""
    from .log import log
    specs = [(args.model, args.weights)] + [fuse_spec(s) for s in args.fuse.split(",") if s]
    models = []
    for model, weights in specs:
        models.append(FeatureModel(model or infer_model(weights), weights, layer=args.layer))
    scales = args.scales
    sets = {split: ImageSet(args.source, split) for split in ("train", "test")}
    for m in models:
        qs = ", ".join("as is" if q is None else str(q) for q in scales or m.scales)
        log(f"{m.name}: descriptor '{m.layer}', Q = {qs}, {args.aggregate}, flip {'on' if args.flip else 'off'}")
    feats = {}
    for split, images in sets.items():
        feats[split] = descriptors(models, images, scales, args.flip, args.aggregate, args.batch)
        log(f"{split}: {len(images)} images -> descriptors {feats[split].shape[1]}-d")
    if args.features:
        np.savez(args.features, **{f"x_{s}": f for s, f in feats.items()},
                 **{f"y_{s}": images.labels for s, images in sets.items()})
        log(f"wrote {args.features}")
    svm, c, cv = fit_svm(feats["train"], sets["train"].labels, args.svm_c)
    for value, score in cv.items():
        log(f"C = {value:g}: cross-validated mean class recall {100 * score:.2f}%")
    predicted = svm.predict(feats["test"])
    labels = sets["test"].labels
    name = "+".join(m.name for m in models)
    print(f"{'model':<{max(5, len(name))}}  descriptor  {'C':>6}  mean class recall  accuracy")
    print(f"{name:<{max(5, len(name))}}  {feats['test'].shape[1]:>10}  {c:>6g}  "
          f"{100 * mean_class_recall(labels, predicted):16.2f}%  {100 * np.mean(predicted == labels):7.2f}%")
