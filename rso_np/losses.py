"""Logit cross-entropy (softmax cross-entropy on raw scores) and accuracy.

Notation: N samples, K classes; logits (N, K) float, labels (N,) integers in
[0, K).
"""

from ._checks import check_finite, check_float, check_labels, check_ndim
from .backend import get_array_module

AGGREGATIONS = ("mean", "sum")


def _check(logits, labels, agg, check):
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    check_float("logits", logits)
    check_ndim("logits", logits, 2, "(N, K)")
    if check:
        check_labels("labels", labels, logits.shape[0], logits.shape[1])
        check_finite("logits", logits)


def log_softmax(logits):
    """log softmax along the last axis via log-sum-exp: z - max - log(sum(exp(z - max)))."""
    xp = get_array_module(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def per_sample_cross_entropy(logits, labels):
    """-log softmax(logits)[n, labels[n]] for every n: (N,) in the logits' dtype."""
    xp = get_array_module(logits)
    return -log_softmax(logits)[xp.arange(logits.shape[0]), labels]


def logit_cross_entropy(logits, labels, agg="mean", check=True):
    """Softmax cross-entropy of raw scores.

    logits: (N, K) float32/float64; labels: (N,) integer class indices.
    agg: "mean" (average over N) or "sum" (the paper's F, a sum over the
    minibatch).  Returns a 0-d array on the input's backend.  Stable for logits
    of any magnitude: the maximum is subtracted before exponentiating.
    ``check=False`` skips the label-range and finiteness checks (hot loops).
    """
    _check(logits, labels, agg, check)
    losses = per_sample_cross_entropy(logits, labels)
    return losses.sum() if agg == "sum" else losses.mean()


def logit_cross_entropy_backward(logits, labels, agg="mean"):
    """d loss / d logits: softmax(logits) - onehot(labels), divided by N for "mean". (N, K)."""
    _check(logits, labels, agg, True)
    xp = get_array_module(logits)
    g = xp.exp(log_softmax(logits))
    g[xp.arange(logits.shape[0]), labels] -= 1
    if agg == "mean":
        g /= logits.shape[0]
    return g


def accuracy(logits, labels):
    """Share of rows whose largest logit is at the label: a Python float in [0, 1]."""
    check_ndim("logits", logits, 2, "(N, K)")
    check_labels("labels", labels, logits.shape[0], logits.shape[1])
    if logits.shape[0] == 0:
        raise ValueError("accuracy of an empty batch is undefined (logits has 0 rows)")
    return float((logits.argmax(axis=1) == labels).mean())
