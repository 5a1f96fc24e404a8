"""Convolution, pooling, activation and dense kernels as plain functions: the reference.

Notation (CS231n/DeZero): N batch, C channels, H/W height/width, KH/KW kernel
height/width, OH/OW output height/width, C_out output channels. Arrays are NCHW
and float32 (float64 works too and is used by gradient checks). Every function
works on NumPy and CuPy arrays alike, with the same lines, and returns arrays on
the input's backend.

Each forward ``f(x, ...)`` has a ``f_backward(dout, ...)`` that returns the
gradients of a scalar loss with respect to the inputs, given ``dout`` = dL/d(out).

These are the kernels to read. ``fast_kernels.py`` computes some of them with less
work on the CPU (a few images at a time, on every core); its tests check it against
the functions here.
"""

from ._checks import as_pair, check_conv, check_float, check_ndim
from .backend import get_array_module

# --------------------------------------------------------------------------- im2col


def conv_output_size(size, k, stride, padding):
    """Output length of a convolution/pool along one axis (floor mode)."""
    return (size + 2 * padding - k) // stride + 1


def conv_geometry(x_shape, KH, KW, stride, padding):
    """(OH, OW) of a KH x KW convolution of an input of shape (N, C, H, W), or a ValueError saying why
    the kernel does not fit."""
    H, W = x_shape[2:]
    (sh, sw), (ph, pw) = as_pair(stride, "stride"), as_pair(padding, "padding")
    OH, OW = conv_output_size(H, KH, sh, ph), conv_output_size(W, KW, sw, pw)
    if OH < 1 or OW < 1:
        raise ValueError(f"kernel {KH}x{KW} does not fit input {H}x{W} with padding {padding}")
    return OH, OW


def patch_view(xh, KH, KW, stride, OH, OW):
    """Every KH x KW patch of a padded channels-last batch xh (N, H + 2*ph, W + 2*pw, C), without copying
    anything: a strided view (N, OH, OW, KH, KW*C) with

        patches[n, oh, ow, kh, kw*C + c] = xh[n, oh*sh + kh, ow*sw + kw, c].

    Channels-last makes the KW*C numbers one kernel row needs contiguous in memory, so only the step
    between patches (the stride) and between kernel rows needs the strided view."""
    sh, sw = as_pair(stride, "stride")
    s = xh.strides
    return get_array_module(xh).lib.stride_tricks.as_strided(
        xh, shape=(xh.shape[0], OH, OW, KH, KW * xh.shape[3]), strides=(s[0], s[1] * sh, s[2] * sw, s[1], s[3]))


def im2col(x, KH, KW, stride=1, padding=0):
    """Unfold image patches into one contiguous matrix.

    x: (N, C, H, W) float.  Returns ``col`` of shape (N*OH*OW, KH*KW*C), row
    (n, oh, ow) holding the KH x KW x C patch that output pixel (oh, ow) of image
    n sees, in (kh, kw, c) order, plus (OH, OW). The image is padded and laid out
    channels-last, and one copy of its patch view (``patch_view``) is the matrix.
    """
    xp = get_array_module(x)
    N, C, H, W = x.shape
    ph, pw = as_pair(padding, "padding")
    OH, OW = conv_geometry(x.shape, KH, KW, stride, padding)
    xh = xp.zeros((N, H + 2 * ph, W + 2 * pw, C), dtype=x.dtype)
    xh[:, ph:ph + H, pw:pw + W, :] = x.transpose(0, 2, 3, 1)
    col = xp.ascontiguousarray(patch_view(xh, KH, KW, stride, OH, OW))
    return col.reshape(N * OH * OW, KH * KW * C), (OH, OW)


def col2im(col, x_shape, KH, KW, stride=1, padding=0):
    """Adjoint of :func:`im2col`: sum patch gradients back into an image.

    col: (N*OH*OW, KH*KW*C).  Returns (N, C, H, W).
    """
    xp = get_array_module(col)
    N, C, H, W = x_shape
    sh, sw = as_pair(stride, "stride")
    ph, pw = as_pair(padding, "padding")
    OH = conv_output_size(H, KH, sh, ph)
    OW = conv_output_size(W, KW, sw, pw)
    col = col.reshape(N, OH, OW, KH, KW, C)
    xh = xp.zeros((N, H + 2 * ph, W + 2 * pw, C), dtype=col.dtype)
    for i in range(KH):
        for j in range(KW):
            xh[:, i:i + sh * OH:sh, j:j + sw * OW:sw, :] += col[:, :, :, i, j, :]
    return xh[:, ph:ph + H, pw:pw + W, :].transpose(0, 3, 1, 2)


def weight_matrix(W):
    """(C_out, C_in, KH, KW) -> (C_out, KH*KW*C_in), matching im2col's (kh, kw, c) order."""
    C_out = W.shape[0]
    return W.transpose(0, 2, 3, 1).reshape(C_out, -1)


# --------------------------------------------------------------------------- convolution


def conv2d(x, W, b=None, stride=1, padding=0):
    """2-d cross-correlation (what deep learning calls convolution).

    x: (N, C_in, H, W) float32; W: (C_out, C_in, KH, KW) (PyTorch's layout);
    b: (C_out,) or None.  Returns (N, C_out, OH, OW) with
    OH = (H + 2*padding - KH) // stride + 1.

    im2col turns the input into one (N*OH*OW, KH*KW*C_in) matrix; one matrix
    product with the (KH*KW*C_in, C_out) weights gives every output at once.
    """
    check_conv(x, W, b)
    N, C_out, KH, KW = x.shape[0], W.shape[0], W.shape[2], W.shape[3]
    col, (OH, OW) = im2col(x, KH, KW, stride, padding)   # (N*OH*OW, KH*KW*C_in)
    out = col @ weight_matrix(W).T                        # (N*OH*OW, C_out)
    if b is not None:
        out += b
    return out.reshape(N, OH, OW, C_out).transpose(0, 3, 1, 2)


def conv2d_naive(x, W, b=None, stride=1, padding=0):
    """The same as :func:`conv2d`, with plain loops: the readable reference.

    out[n, o, i, j] = b[o] + sum_{c, ki, kj} W[o, c, ki, kj] * xpad[n, c, i*s + ki, j*s + kj]
    """
    check_conv(x, W, b)
    xp = get_array_module(x)
    N, C, H, Wd = x.shape
    C_out, _, KH, KW = W.shape
    sh, sw = as_pair(stride, "stride")
    ph, pw = as_pair(padding, "padding")
    OH = conv_output_size(H, KH, sh, ph)
    OW = conv_output_size(Wd, KW, sw, pw)
    xpad = xp.zeros((N, C, H + 2 * ph, Wd + 2 * pw), dtype=x.dtype)
    xpad[:, :, ph:ph + H, pw:pw + Wd] = x
    out = xp.zeros((N, C_out, OH, OW), dtype=x.dtype)
    for n in range(N):
        for o in range(C_out):
            for i in range(OH):
                for j in range(OW):
                    patch = xpad[n, :, i * sh:i * sh + KH, j * sw:j * sw + KW]
                    out[n, o, i, j] = (patch * W[o]).sum() + (b[o] if b is not None else 0)
    return out


def conv2d_backward(dout, x, W, b=None, stride=1, padding=0):
    """Gradients of :func:`conv2d`.

    dout: (N, C_out, OH, OW).  Returns (dx (N, C_in, H, W), dW like W, db (C_out,)
    or None when ``b`` is None).
    """
    N = x.shape[0]
    C_out, C_in, KH, KW = W.shape
    col, (OH, OW) = im2col(x, KH, KW, stride, padding)
    d2 = dout.transpose(0, 2, 3, 1).reshape(N * OH * OW, C_out)
    dWm = d2.T @ col                                       # (C_out, KH*KW*C_in)
    dW = dWm.reshape(C_out, KH, KW, C_in).transpose(0, 3, 1, 2)
    dcol = d2 @ weight_matrix(W)                          # (N*OH*OW, KH*KW*C_in)
    dx = col2im(dcol, x.shape, KH, KW, stride, padding)
    db = d2.sum(axis=0) if b is not None else None
    return dx, dW, db


# --------------------------------------------------------------------------- pooling


def check_x(x, name="x"):
    check_float(name, x)
    check_ndim(name, x, 4, "(N, C, H, W)")


def _pool_geometry(x, kernel_size, stride):
    check_x(x)
    KH, KW = as_pair(kernel_size, "kernel_size")
    sh, sw = as_pair(kernel_size if stride is None else stride, "stride")
    H, W = x.shape[2:]
    OH, OW = conv_output_size(H, KH, sh, 0), conv_output_size(W, KW, sw, 0)
    if OH < 1 or OW < 1:
        raise ValueError(f"pool kernel {KH}x{KW} does not fit input {H}x{W} (x shape {x.shape})")
    return KH, KW, sh, sw, OH, OW


def max_pool2d(x, kernel_size=2, stride=None):
    """Max over KH x KW windows. x: (N, C, H, W); stride defaults to kernel_size.

    Returns (N, C, OH, OW), OH = (H - KH) // stride + 1 (floor mode, no padding).
    """
    KH, KW, sh, sw, OH, OW = _pool_geometry(x, kernel_size, stride)
    out = None
    for i in range(KH):
        for j in range(KW):
            s = x[:, :, i:i + sh * OH:sh, j:j + sw * OW:sw]
            out = s.copy() if out is None else get_array_module(x).maximum(out, s)
    return out


def max_pool2d_backward(dout, x, kernel_size=2, stride=None):
    """Gradient of :func:`max_pool2d`: each window's gradient goes to its first maximum."""
    xp = get_array_module(x)
    KH, KW, sh, sw, OH, OW = _pool_geometry(x, kernel_size, stride)
    out = max_pool2d(x, kernel_size, stride)
    dx = xp.zeros_like(x)
    taken = xp.zeros(out.shape, dtype=bool)
    for i in range(KH):
        for j in range(KW):
            s = x[:, :, i:i + sh * OH:sh, j:j + sw * OW:sw]
            hit = (s == out) & ~taken
            taken |= hit
            dx[:, :, i:i + sh * OH:sh, j:j + sw * OW:sw] += dout * hit
    return dx


def avg_pool2d(x, kernel_size=2, stride=None):
    """Mean over KH x KW windows. x: (N, C, H, W) -> (N, C, OH, OW)."""
    KH, KW, sh, sw, OH, OW = _pool_geometry(x, kernel_size, stride)
    out = None
    for i in range(KH):
        for j in range(KW):
            s = x[:, :, i:i + sh * OH:sh, j:j + sw * OW:sw]
            if out is None:
                out = s.copy(order="K")   # in x's memory order (a conv's output is NHWC underneath)
            else:
                out += s
    out *= x.dtype.type(1.0 / (KH * KW))
    return out


def avg_pool2d_backward(dout, x_shape, kernel_size=2, stride=None):
    """Gradient of :func:`avg_pool2d`. dout: (N, C, OH, OW) -> dx (N, C, H, W)."""
    xp = get_array_module(dout)
    KH, KW = as_pair(kernel_size, "kernel_size")
    sh, sw = as_pair(kernel_size if stride is None else stride, "stride")
    OH, OW = dout.shape[2:]
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    g = dout * dout.dtype.type(1.0 / (KH * KW))
    for i in range(KH):
        for j in range(KW):
            dx[:, :, i:i + sh * OH:sh, j:j + sw * OW:sw] += g
    return dx


def global_avg_pool2d(x):
    """Mean over the whole image. x: (N, C, H, W) -> (N, C)."""
    check_x(x)
    return x.mean(axis=(2, 3))


def global_avg_pool2d_backward(dout, x_shape):
    """Gradient of :func:`global_avg_pool2d`. dout: (N, C) -> (N, C, H, W)."""
    xp = get_array_module(dout)
    H, W = x_shape[2:]
    g = dout * dout.dtype.type(1.0 / (H * W))
    return xp.broadcast_to(g[:, :, None, None], x_shape).copy()


def global_max_pool2d(x):
    """Max over the whole image. x: (N, C, H, W) -> (N, C). (The authors' MXNet code pools this way:
    ``nd.Pooling(global_pool=True)`` without a ``pool_type``, whose default is max.)"""
    check_x(x)
    return x.max(axis=(2, 3))


def global_max_pool2d_backward(dout, x):
    """Gradient of :func:`global_max_pool2d`: each image's and channel's gradient goes to its first
    maximum (in row-major order). dout: (N, C) -> (N, C, H, W)."""
    xp = get_array_module(x)
    N, C, H, W = x.shape
    first = x.reshape(N, C, H * W).argmax(axis=2)                 # argmax: the first maximum
    at_first = xp.arange(H * W) == first[:, :, None]              # (N, C, H*W), one True each
    return (at_first * dout[:, :, None]).astype(dout.dtype).reshape(x.shape)


# --------------------------------------------------------------------------- activations, dense


def relu(x):
    """max(x, 0), elementwise, any shape."""
    check_float("x", x)
    return get_array_module(x).maximum(x, 0)


def relu_backward(dout, x):
    """Gradient of :func:`relu`: dout where x > 0, else 0."""
    return dout * (x > 0)


def flatten(x):
    """(N, ...) -> (N, prod(...)), row-major (C, H, W) order."""
    return x.reshape(x.shape[0], -1)


def flatten_backward(dout, x_shape):
    return dout.reshape(x_shape)


def linear(x, W, b=None):
    """Dense layer: x (N, in) float, W (out, in) (PyTorch's layout), b (out,) -> (N, out)."""
    check_float("x", x)
    check_ndim("x", x, 2, "(N, in_features)")
    check_ndim("W", W, 2, "(out_features, in_features)")
    if W.shape[1] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but W expects in_features={W.shape[1]} "
                         f"(x shape {x.shape}, W shape {W.shape})")
    out = x @ W.T
    if b is not None:
        out += b
    return out


def linear_backward(dout, x, W, b=None):
    """Gradients of :func:`linear`: (dx (N, in), dW (out, in), db (out,) or None)."""
    return dout @ W, dout.T @ x, (dout.sum(axis=0) if b is not None else None)


# --------------------------------------------------------------------------- batch norm


def batch_stats(x):
    """Per-channel mean and (biased) variance of x (N, C, H, W), in x's dtype.

    The sums are taken in float64: a float32 sum over the hundreds of thousands of numbers of one
    channel of a large batch loses several digits.
    """
    xp = get_array_module(x)
    mean = x.mean(axis=(0, 2, 3), dtype=xp.float64)
    var = xp.maximum((x * x).mean(axis=(0, 2, 3), dtype=xp.float64) - mean * mean, 0.0)
    return mean.astype(x.dtype), var.astype(x.dtype)


def batch_norm2d(x, gamma, beta, mean=None, var=None, eps=1e-5):
    """Per-channel normalisation. x: (N, C, H, W); gamma, beta: (C,).

    With ``mean``/``var`` None the batch statistics are used (training and RSO
    search); otherwise the given (population) statistics (evaluation).
    Returns (out, (xhat, inv_std)); the second item is what the backward needs.
    """
    check_x(x)
    C = x.shape[1]
    for name, p in (("gamma", gamma), ("beta", beta)):
        if tuple(p.shape) != (C,):
            raise ValueError(f"{name} must have shape ({C},) for x with {C} channels, got {tuple(p.shape)}")
    xp = get_array_module(x)
    if mean is None:
        mean, var = batch_stats(x)
    inv_std = 1.0 / xp.sqrt(var + eps)
    xhat = (x - mean[:, None, None]) * inv_std[:, None, None]
    out = xhat * gamma[:, None, None] + beta[:, None, None]
    return out.astype(x.dtype, copy=False), (xhat, inv_std)


def batch_norm2d_backward(dout, cache, gamma, batch_stats=True):
    """Gradients of :func:`batch_norm2d`: (dx, dgamma, dbeta).

    ``batch_stats`` says whether the forward used the batch's own statistics
    (then the mean and variance depend on x too) or fixed ones.
    """
    xhat, inv_std = cache
    dbeta = dout.sum(axis=(0, 2, 3))
    dgamma = (dout * xhat).sum(axis=(0, 2, 3))
    dxhat = dout * gamma[:, None, None]
    if not batch_stats:
        return dxhat * inv_std[:, None, None], dgamma, dbeta
    m = dout.shape[0] * dout.shape[2] * dout.shape[3]
    dx = (inv_std[:, None, None] / m) * (
        m * dxhat - dxhat.sum(axis=(0, 2, 3))[:, None, None]
        - xhat * (dxhat * xhat).sum(axis=(0, 2, 3))[:, None, None])
    return dx, dgamma, dbeta
