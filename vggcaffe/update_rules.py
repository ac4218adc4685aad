"""The update rules of Caffe's solver types (each one's ComputeUpdateValue), on one param piece.

A rule gets g, the param's diff already divided by iter_size and with weight
decay added; its history arrays; the local rate (lr * lr_mult); the
SolverParameter p and the iteration t; and returns the step that the update
subtracts from the data (SGD's history itself, the others' in g, the diff):

  SGD       h = momentum h + rate g                                  step = h
  Nesterov  h' = momentum h + rate g                    step = (1 + momentum) h' - momentum h
  AdaGrad   h = h + g^2                                  step = rate g / (sqrt(h) + delta)
  RMSProp   h = rms_decay h + (1 - rms_decay) g^2        step = rate g / (sqrt(h) + delta)
  AdaDelta  h = momentum h + (1 - momentum) g^2,  u = g sqrt((h2 + delta) / (h + delta)),
            h2 = momentum h2 + (1 - momentum) u^2                    step = rate u
  Adam      m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2  (b1 = momentum, b2 = momentum2)
            step = rate sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) m / (sqrt(v) + delta)

AdaDelta and Adam keep two histories per param; the solver holds all first
histories, then all second ones, as Caffe's history_ and its .solverstate do.
Every rule is elementwise NumPy/CuPy (`xp`); `tmp` is a scratch array.
"""
from .errors import VggcaffeError

HISTORIES = {"SGD": 1, "Nesterov": 1, "AdaGrad": 1, "RMSProp": 1, "AdaDelta": 2, "Adam": 2}


def check(p):
    """Caffe's solver constructors' checks of the type's settings."""
    kind = p.type or "SGD"
    if kind not in HISTORIES:
        raise VggcaffeError(f"unknown solver type '{kind}'; known: {', '.join(HISTORIES)}")
    if kind in ("AdaGrad", "RMSProp") and p.momentum != 0:
        raise VggcaffeError(f"momentum cannot be used with {kind}; leave it 0")
    if kind == "RMSProp" and not 0 <= p.rms_decay < 1:
        raise VggcaffeError(f"rms_decay should lie in [0, 1), got {p.rms_decay}")
    return kind


def sgd(xp, g, hist, rate, p, t, tmp):
    h, = hist
    h *= p.momentum
    xp.multiply(g, rate, out=tmp)
    h += tmp
    return h


def nesterov(xp, g, hist, rate, p, t, tmp):
    h, = hist
    xp.multiply(h, -p.momentum, out=tmp)              # -momentum * the previous history
    h *= p.momentum
    h += rate * g
    xp.multiply(h, 1 + p.momentum, out=g)
    g += tmp
    return g


def _scaled_by_root(xp, g, h, rate, p, tmp):
    """g = rate g / (sqrt(h) + delta)."""
    xp.sqrt(h, out=tmp)
    tmp += p.delta
    xp.divide(g, tmp, out=g)
    g *= rate


def adagrad(xp, g, hist, rate, p, t, tmp):
    h, = hist
    h += g * g
    _scaled_by_root(xp, g, h, rate, p, tmp)
    return g


def rmsprop(xp, g, hist, rate, p, t, tmp):
    h, = hist
    h *= p.rms_decay
    h += (1 - p.rms_decay) * (g * g)
    _scaled_by_root(xp, g, h, rate, p, tmp)
    return g


def adadelta(xp, g, hist, rate, p, t, tmp):
    h, h2 = hist
    h *= p.momentum
    h += (1 - p.momentum) * (g * g)
    xp.divide(h2 + p.delta, h + p.delta, out=tmp)
    xp.sqrt(tmp, out=tmp)
    g *= tmp                                           # u
    h2 *= p.momentum
    h2 += (1 - p.momentum) * (g * g)
    g *= rate
    return g


def adam(xp, g, hist, rate, p, t, tmp):
    m, v = hist
    b1, b2 = p.momentum, p.momentum2
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * (g * g)
    correction = (1 - b2 ** (t + 1)) ** 0.5 / (1 - b1 ** (t + 1))
    xp.sqrt(v, out=tmp)
    tmp += p.delta
    xp.divide(m, tmp, out=g)
    g *= rate * correction
    return g


RULES = {"SGD": sgd, "Nesterov": nesterov, "AdaGrad": adagrad, "RMSProp": rmsprop, "AdaDelta": adadelta,
         "Adam": adam}
