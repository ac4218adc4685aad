"""What Caffe's Net::Init does to a NetParameter before it builds layers.

The NetState a net is built with (net_state: phase, the net's own state, a
solver's train_state / test_state, pycaffe's level and stages); the layers it
keeps (filter_net: include / exclude rules); hidden Split layers where a blob
feeds several layers, so each gets its own diff and backward sums them
(insert_splits); and the net's outputs, the blobs left after its last layer
(available_blobs).
"""
from .errors import VggcaffeError
from .proto import caffe_pb2

PHASES = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST}


def state_meets_rule(state, rule):
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    return all(s in stages for s in rule.stage) and not any(s in stages for s in rule.not_stage)


def net_state(net_param, phase, extra=None, level=0, stages=()):
    """The NetState a net of `net_param` is built with, as in Caffe: the phase, over it the
    net's own `state`, over that `extra` (a solver's train_state or test_state); without
    `extra`, pycaffe's Net(model, phase, level, stages): the stages added, the level set."""
    state = caffe_pb2.NetState()
    state.MergeFrom(net_param.state)
    if extra is not None:
        state.MergeFrom(extra)
    else:
        state.stage.extend(stages)
        state.level = level
    state.phase = PHASES[phase]
    return state


def filter_net(net_param, state):
    """The layers of `net_param` that `state` keeps (Caffe's FilterNet)."""
    kept = caffe_pb2.NetParameter()
    kept.CopyFrom(net_param)
    kept.ClearField("layer")
    for layer in net_param.layer:
        if layer.include and layer.exclude:
            raise VggcaffeError(f"layer '{layer.name}' has both include and exclude rules; use one")
        if layer.include:
            keep = any(state_meets_rule(state, r) for r in layer.include)
        else:
            keep = not any(state_meets_rule(state, r) for r in layer.exclude)
        if keep:
            kept.layer.add().CopyFrom(layer)
    return kept


def insert_splits(net_param, default_loss):
    """Caffe's InsertSplits: give each extra consumer of a blob its own copy via a Split layer.

    `default_loss(layer_param)` is the loss weight of a layer's first top when
    the prototxt gives none. Returns a new NetParameter.
    """
    consumers, producer = {}, {}
    for li, layer in enumerate(net_param.layer):
        for bi, name in enumerate(layer.bottom):
            key = producer.get(name, (None, name))
            consumers.setdefault(key, []).append((li, bi))
        for ti, name in enumerate(layer.top):
            producer[name] = (li, name)
            weights = list(layer.loss_weight) or ([default_loss(layer)] if ti == 0 else [])
            if ti < len(weights) and weights[ti] != 0:
                consumers.setdefault((li, name), []).append(("loss", ti))
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    out.ClearField("layer")
    renamed = {}
    for li, layer in enumerate(net_param.layer):
        new = caffe_pb2.LayerParameter()
        new.CopyFrom(layer)
        for bi, name in enumerate(layer.bottom):
            if (li, bi) in renamed:
                new.bottom[bi] = renamed[(li, bi)]
        added = out.layer.add()
        added.CopyFrom(new)
        for ti, name in enumerate(layer.top):
            users = consumers.get((li, name), [])
            if len(users) <= 1:
                continue
            base = f"{name}_{layer.name}_{ti}_split"
            split = out.layer.add(name=base, type="Split", bottom=[name])
            for k, (u, b) in enumerate(users):
                split.top.append(f"{base}_{k}")
                if u != "loss":
                    renamed[(u, b)] = f"{base}_{k}"
                    continue
                # The loss moves onto the split's top, as in Caffe.
                weights = list(layer.loss_weight) or [default_loss(layer)]
                weights += [0.0] * (len(layer.top) - len(weights))
                split.loss_weight.extend([0.0] * k + [weights[ti]])
                weights[ti] = 0.0
                added.ClearField("loss_weight")
                added.loss_weight.extend(weights)
    return out


def available_blobs(net_param):
    """The blobs left after the last layer (Caffe's net outputs): each layer uses up its
    bottoms and makes its tops, so an in-place layer's top stays available."""
    available = set()
    for lp in net_param.layer:
        available.difference_update(lp.bottom)
        available.update(lp.top)
    return available
