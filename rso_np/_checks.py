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


def as_pair(v, name):
    """An int or a pair of ints (a stride, a padding, a kernel size) as a pair of ints."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def check_channels(x_shape, W):
    """A convolution's input (N, C_in, H, W) against its weights (C_out, C_in, KH, KW)."""
    if W.shape[1] != x_shape[1]:
        raise ValueError(f"x has {x_shape[1]} channels but W expects C_in={W.shape[1]} "
                         f"(x shape {tuple(x_shape)}, W shape {W.shape})")


def check_conv(x, W, b):
    """The arguments of a convolution: x (N, C_in, H, W), W (C_out, C_in, KH, KW), b (C_out,) or None."""
    check_float("x", x)
    check_ndim("x", x, 4, "(N, C, H, W)")
    check_float("W", W)
    check_ndim("W", W, 4, "(C_out, C_in, KH, KW)")
    check_channels(x.shape, W)
    if b is not None and tuple(b.shape) != (W.shape[0],):
        raise ValueError(f"b must have shape ({W.shape[0]},), got {tuple(b.shape)}")
