"""Input checks shared by the kernels, layers and losses.

Each check raises ``ValueError`` naming the argument, what was expected and what
was given.
"""

from .backend import get_array_module


def check_float(name, x):
    xp = get_array_module(x)
    if not hasattr(x, "dtype") or not xp.issubdtype(x.dtype, xp.floating):
        got = getattr(x, "dtype", type(x).__name__)
        raise ValueError(f"{name} must be a floating-point array (float32 or float64), got dtype {got}")


def check_ndim(name, x, ndim, layout):
    if getattr(x, "ndim", None) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {getattr(x, 'shape', None)}")


def check_finite(name, x):
    xp = get_array_module(x)
    if not bool(xp.isfinite(x).all()):
        bad = int((~xp.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")


def check_labels(name, labels, n, num_classes):
    xp = get_array_module(labels)
    if getattr(labels, "ndim", None) != 1:
        raise ValueError(f"{name} must be a 1-d integer array of shape ({n},), got shape "
                         f"{getattr(labels, 'shape', None)}")
    if not xp.issubdtype(labels.dtype, xp.integer):
        raise ValueError(f"{name} must hold integers (class indices), got dtype {labels.dtype}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} must have length {n} (one per row of logits), got {labels.shape[0]}")
    if n:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} must lie in [0, {num_classes - 1}], got {bad}")
