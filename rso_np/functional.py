"""Convolution, pooling, activation and dense kernels as plain functions.

Notation (CS231n/DeZero): N batch, C channels, H/W height/width, KH/KW kernel
height/width, OH/OW output height/width, C_out output channels. Arrays are NCHW
and float32 (float64 works too and is used by gradient checks). Every function
works on NumPy and CuPy arrays alike and returns arrays on the input's backend.

Each forward ``f(x, ...)`` has a ``f_backward(dout, ...)`` that returns the
gradients of a scalar loss with respect to the inputs, given ``dout`` = dL/d(out).
"""

import contextlib
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._checks import check_float, check_ndim
from .backend import get_array_module

CONV_BLOCK_BYTES = 1 << 20     # conv2d on the CPU: the size of one block of the patch matrix (see conv2d)
CONV_THREADS = None            # conv2d on the CPU: threads sharing the images; None: one per usable core

# --------------------------------------------------------------------------- helpers


def _pair(v, name):
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
        a, b = int(v[0]), int(v[1])
    else:
        a = b = int(v)
    return a, b


def conv_output_size(size, k, stride, padding):
    """Output length of a convolution/pool along one axis (floor mode)."""
    return (size + 2 * padding - k) // stride + 1


def _check_x(x, name="x"):
    check_float(name, x)
    check_ndim(name, x, 4, "(N, C, H, W)")


# --------------------------------------------------------------------------- im2col


def _as_strided(x, shape, strides):
    xp = get_array_module(x)
    return xp.lib.stride_tricks.as_strided(x, shape=shape, strides=strides)


def _conv_geometry(x_shape, KH, KW, stride, padding):
    """(OH, OW) of a KH x KW convolution of an input of shape x_shape, or a ValueError saying why the
    kernel does not fit."""
    H, W = x_shape[2:]
    (sh, sw), (ph, pw) = _pair(stride, "stride"), _pair(padding, "padding")
    OH, OW = conv_output_size(H, KH, sh, ph), conv_output_size(W, KW, sw, pw)
    if OH < 1 or OW < 1:
        raise ValueError(f"kernel {KH}x{KW} does not fit input {H}x{W} with padding {padding}")
    return OH, OW


def _patches(x, KH, KW, stride, padding):
    """Every KH x KW patch of x, in place: a strided view (N, OH, OW, KH, KW*C), plus (OH, OW).

    The image is first laid out as padded NHWC, so that for one kernel row kh the KW*C numbers a patch
    needs are contiguous in memory; the view then shows patch (n, oh, ow) without copying anything.
    """
    xp = get_array_module(x)
    N, C, H, W = x.shape
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    OH, OW = _conv_geometry(x.shape, KH, KW, stride, padding)
    xh = xp.zeros((N, H + 2 * ph, W + 2 * pw, C), dtype=x.dtype)
    xh[:, ph:ph + H, pw:pw + W, :] = x.transpose(0, 2, 3, 1)
    return _patch_view(xh, OH, OW, KH, KW, sh, sw), (OH, OW)


def _patch_view(xh, OH, OW, KH, KW, sh, sw):
    """The patches of a padded NHWC array xh as a strided view (N, OH, OW, KH, KW*C):
    patches[n, oh, ow, kh, kw*C + c] = xh[n, oh*sh + kh, ow*sw + kw, c]."""
    s = xh.strides
    return _as_strided(xh, (xh.shape[0], OH, OW, KH, KW * xh.shape[3]), (s[0], s[1] * sh, s[2] * sw, s[1], s[3]))


def im2col(x, KH, KW, stride=1, padding=0):
    """Unfold image patches into one contiguous matrix.

    x: (N, C, H, W) float.  Returns ``col`` of shape (N*OH*OW, KH*KW*C), row
    (n, oh, ow) holding the KH x KW x C patch that output pixel (oh, ow) of image
    n sees, in (kh, kw, c) order, plus (OH, OW). One copy of the strided patch
    view (see ``_patches``) makes the matrix that a single BLAS call multiplies.
    """
    patches, (OH, OW) = _patches(x, KH, KW, stride, padding)
    col = get_array_module(x).ascontiguousarray(patches)
    return col.reshape(-1, patches.shape[3] * patches.shape[4]), (OH, OW)


def col2im(col, x_shape, KH, KW, stride=1, padding=0):
    """Adjoint of :func:`im2col`: sum patch gradients back into an image.

    col: (N*OH*OW, KH*KW*C).  Returns (N, C, H, W).
    """
    xp = get_array_module(col)
    N, C, H, W = x_shape
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    OH = conv_output_size(H, KH, sh, ph)
    OW = conv_output_size(W, KW, sw, pw)
    col = col.reshape(N, OH, OW, KH, KW, C)
    xh = xp.zeros((N, H + 2 * ph, W + 2 * pw, C), dtype=col.dtype)
    for i in range(KH):
        for j in range(KW):
            xh[:, i:i + sh * OH:sh, j:j + sw * OW:sw, :] += col[:, :, :, i, j, :]
    return xh[:, ph:ph + H, pw:pw + W, :].transpose(0, 3, 1, 2)


def _weight_matrix(W):
    """(C_out, C_in, KH, KW) -> (C_out, KH*KW*C_in), matching im2col's (kh, kw, c) order."""
    C_out = W.shape[0]
    return W.transpose(0, 2, 3, 1).reshape(C_out, -1)


# --------------------------------------------------------------------------- convolution


def _check_channels(x_shape, W):
    if W.shape[1] != x_shape[1]:
        raise ValueError(f"x has {x_shape[1]} channels but W expects C_in={W.shape[1]} "
                         f"(x shape {tuple(x_shape)}, W shape {W.shape})")


def _check_conv(x, W, b):
    _check_x(x)
    check_float("W", W)
    check_ndim("W", W, 4, "(C_out, C_in, KH, KW)")
    _check_channels(x.shape, W)
    if b is not None and tuple(b.shape) != (W.shape[0],):
        raise ValueError(f"b must have shape ({W.shape[0]},), got {tuple(b.shape)}")


def conv2d(x, W, b=None, stride=1, padding=0):
    """2-d cross-correlation (what deep learning calls convolution).

    x: (N, C_in, H, W) float32; W: (C_out, C_in, KH, KW) (PyTorch's layout);
    b: (C_out,) or None.  Returns (N, C_out, OH, OW) with
    OH = (H + 2*padding - KH) // stride + 1.

    im2col turns the input into one (N*OH*OW, KH*KW*C_in) matrix; one matrix
    product with the (KH*KW*C_in, C_out) weights gives every output at once
    (done here a block of images at a time, which gives the same numbers).
    """
    _check_conv(x, W, b)
    xp = get_array_module(x)
    if xp is not np:                                       # a GPU takes the whole batch in one product
        C_out, _, KH, KW = W.shape
        Wm = xp.ascontiguousarray(_weight_matrix(W).T)     # (KH*KW*C_in, C_out)
        patches, (OH, OW) = _patches(x, KH, KW, stride, padding)
        out = xp.matmul(patches.reshape(-1, Wm.shape[0]), Wm).reshape(x.shape[0], OH, OW, C_out)
        if b is not None:
            out += b
        return out.transpose(0, 3, 1, 2)
    return conv2d_from(lambda dst, s, e: _copy_nhwc(x, s, e, dst), x.shape, W, b, stride, padding, x.dtype)


def _copy_nhwc(x, s, e, dst):
    dst[...] = x[s:e].transpose(0, 2, 3, 1)


def conv2d_from(fill, x_shape, W, b=None, stride=1, padding=0, dtype=np.float32, out=None, relu=False):
    """conv2d (NumPy) of an input that is never stored whole: ``fill(dst, s, e)`` writes images s..e-1,
    channels-last (e - s, H, W, C_in), into ``dst`` (a view into a scratch buffer). ``x_shape`` is
    (N, C_in, H, W). This lets a caller gather, add or apply ReLU while the images are copied anyway.
    ``out``: an array (N, OH, OW, C_out) (C-contiguous) to write the result into, instead of a new one;
    ``relu``: return relu(conv2d(...)), applied to each block while it is in the cache.

    The full im2col matrix is KH*KW times the input: writing it to memory and reading it back costs more
    than the product itself. A few images at a time keep their patch matrix in the cache; inside
    ``parallel_cpu()`` every core takes a share of the images (the results are the same).
    """
    N = x_shape[0]
    C_out, _, KH, KW = W.shape
    _check_channels(x_shape, W)
    Wm = np.ascontiguousarray(_weight_matrix(W).T)         # (KH*KW*C_in, C_out)
    OH, OW = _conv_geometry(x_shape, KH, KW, stride, padding)
    if out is None:
        out = np.empty((N, OH, OW, C_out), dtype=dtype)
    elif out.shape != (N, OH, OW, C_out) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {np.dtype(dtype).name} array of shape "
                         f"{(N, OH, OW, C_out)}, got {out.dtype.name} {out.shape}")
    block = max(1, CONV_BLOCK_BYTES // (OH * OW * Wm.shape[0] * np.dtype(dtype).itemsize))
    bias = None if b is None else np.asarray(b, dtype=dtype)
    _run_split(N, block, lambda blocks: _conv_images(fill, blocks, x_shape, Wm, out, KH, KW, stride, padding,
                                                     min(block, N), bias, relu))
    return out.transpose(0, 3, 1, 2)


def _conv_images(fill, blocks, x_shape, Wm, out, KH, KW, stride, padding, n, bias=None, relu=False):
    """The blocks of images (start, stop) of conv2d_from into out (N, OH, OW, C_out); n: the largest block.

    Per block: fill() lays the images out padded and channels-last in a small buffer, their patch matrix
    (im2col, see ``_patches``) is copied from it, and one matrix product writes the block's outputs.
    The buffers are the thread's own and are kept between calls (their zero border stays zero), so
    nothing large is allocated and everything a block touches stays in the cache.
    """
    _, C, H, W = x_shape
    (sh, sw), (ph, pw) = _pair(stride, "stride"), _pair(padding, "padding")
    K, C_out = Wm.shape
    OH, OW = out.shape[1:3]
    xh = _thread_buffer("pad", (n, H + 2 * ph, W + 2 * pw, C), out.dtype, zero=True)
    # With few input channels a patch row is a few numbers long and copying it row by row is slow:
    # then the matrix is built transposed, one kernel tap at a time (rows of n*OH*OW numbers).
    by_tap = KW * C < 8
    if by_tap:
        colT = _thread_buffer("colT", (K, n * OH * OW), out.dtype)
    else:
        col = _thread_buffer("col", (n, OH, OW, KH, KW * C), out.dtype)
        patches = _patch_view(xh, OH, OW, KH, KW, sh, sw)
        full = col.reshape(-1, K)                          # a whole block's matrix, a view made once
    inner = xh[:, ph:ph + H, pw:pw + W, :]
    out2 = out.reshape(-1, C_out)
    rows = OH * OW                                         # output pixels (matrix rows) per image
    for s, e in blocks:
        m = e - s
        fill(inner if m == n else inner[:m], s, e)
        if by_tap:
            A = colT[:, :m * rows]                         # rows in (kh, kw, c) order, as _weight_matrix
            for ki in range(KH):
                for kj in range(KW):
                    t = (ki * KW + kj) * C
                    A[t:t + C].reshape(C, m, OH, OW)[...] = \
                        xh[:m, ki:ki + sh * OH:sh, kj:kj + sw * OW:sw].transpose(3, 0, 1, 2)
            A = A.T
        elif m == n:
            col[...] = patches
            A = full
        else:                                              # the last, partial block
            col[:m] = patches[:m]
            A = col[:m].reshape(-1, K)
        o = out2[s * rows:e * rows]
        np.matmul(A, Wm, out=o)
        if bias is not None:
            o += bias
        if relu:
            np.maximum(o, 0, out=o)


# --------------------------------------------------------------------------- CPU threads

_threads = threading.local()     # .inside: this thread works for a split; .buffers: see _thread_buffer
_executors = {}                  # thread count -> ThreadPoolExecutor (the calling thread is the other one)
_parallel = {"depth": 0}         # parallel_cpu contexts entered (0: conv2d runs serially)
_blas = []                       # [threadpoolctl controller or None], made on first use


def _thread_buffer(name, shape, dtype, zero=False):
    """A scratch array of this thread, kept for the next call with the same name, shape and dtype
    (``zero``: zero-filled when made; whoever uses it keeps the parts it relies on zero)."""
    bufs = getattr(_threads, "buffers", None)
    if bufs is None:
        bufs = _threads.buffers = {}
    key = (name, shape, np.dtype(dtype).str)
    if key not in bufs:
        if len(bufs) >= 32:                              # a few shapes recur in a run; forget the rest
            bufs.clear()
        bufs[key] = (np.zeros if zero else np.empty)(shape, dtype=dtype)
    return bufs[key]


def cpu_threads():
    """How many threads conv2d shares images between on the CPU: ``CONV_THREADS``, else the usable cores."""
    if CONV_THREADS is not None:
        return max(1, int(CONV_THREADS))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                               # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def _blas_controller():
    """threadpoolctl's controller of the loaded BLAS libraries, or None without threadpoolctl."""
    if not _blas:
        try:
            from threadpoolctl import ThreadpoolController
            _blas.append(ThreadpoolController())
        except ImportError:
            _blas.append(None)
    return _blas[0]


@contextlib.contextmanager
def parallel_cpu():
    """Within this context, conv2d on the CPU gives each core a share of a batch's images.

    BLAS is set to one thread for the whole context (with threadpoolctl; without it, or with one core,
    nothing changes): the split is the parallelism, and for the small matrix products of one block of
    images one BLAS thread is faster than several. The RSO engines search inside it. It may be nested;
    the outermost one restores BLAS's thread count.
    """
    if _parallel["depth"]:                               # nested: the outer context has set things up
        _parallel["depth"] += 1
        try:
            yield
        finally:
            _parallel["depth"] -= 1
        return
    ctl = _blas_controller() if cpu_threads() > 1 else None
    if ctl is None:
        yield
        return
    with ctl.limit(limits=1, user_api="blas"):
        _parallel["depth"] = 1
        try:
            yield
        finally:
            _parallel["depth"] = 0


def _run_split(n, block, work):
    """work(blocks) over images 0..n-1 in blocks of ``block``: ``blocks`` yields (start, stop) pairs. Inside
    ``parallel_cpu`` every thread runs work() and the threads claim the next block from a shared counter
    (a thread slowed down by something else takes fewer); serially otherwise."""
    count = -(-n // block)
    threads = min(cpu_threads(), count)
    if threads < 2 or not _parallel["depth"] or getattr(_threads, "inside", False):
        work((s, min(n, s + block)) for s in range(0, n, block))
        return
    counter = itertools.count()                            # next() on it is atomic: one block per claim

    def claims():
        for k in counter:
            if k >= count:
                return
            yield k * block, min(n, (k + 1) * block)

    def inside():
        _threads.inside = True
        work(claims())

    if threads not in _executors:
        _executors[threads] = ThreadPoolExecutor(threads - 1, thread_name_prefix="rso_np")
    futures = [_executors[threads].submit(inside) for _ in range(threads - 1)]
    _threads.inside = True                                 # a nested conv2d in fill() runs serially
    try:
        work(claims())                                     # the calling thread claims blocks too
    finally:
        _threads.inside = False
        for f in futures:
            f.result()


def conv2d_naive(x, W, b=None, stride=1, padding=0):
    """The same as :func:`conv2d`, with plain loops: the readable reference.

    out[n, o, i, j] = b[o] + sum_{c, ki, kj} W[o, c, ki, kj] * xpad[n, c, i*s + ki, j*s + kj]
    """
    _check_conv(x, W, b)
    xp = get_array_module(x)
    N, C, H, Wd = x.shape
    C_out, _, KH, KW = W.shape
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
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
    dcol = d2 @ _weight_matrix(W)                          # (N*OH*OW, KH*KW*C_in)
    dx = col2im(dcol, x.shape, KH, KW, stride, padding)
    db = d2.sum(axis=0) if b is not None else None
    return dx, dW, db


# --------------------------------------------------------------------------- pooling


def _pool_geometry(x, kernel_size, stride):
    _check_x(x)
    KH, KW = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(kernel_size if stride is None else stride, "stride")
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
    KH, KW = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(kernel_size if stride is None else stride, "stride")
    OH, OW = dout.shape[2:]
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    g = dout * dout.dtype.type(1.0 / (KH * KW))
    for i in range(KH):
        for j in range(KW):
            dx[:, :, i:i + sh * OH:sh, j:j + sw * OW:sw] += g
    return dx


def global_avg_pool2d(x):
    """Mean over the whole image. x: (N, C, H, W) -> (N, C)."""
    _check_x(x)
    return x.mean(axis=(2, 3))


def global_avg_pool2d_backward(dout, x_shape):
    """Gradient of :func:`global_avg_pool2d`. dout: (N, C) -> (N, C, H, W)."""
    xp = get_array_module(dout)
    H, W = x_shape[2:]
    g = dout * dout.dtype.type(1.0 / (H * W))
    return xp.broadcast_to(g[:, :, None, None], x_shape).copy()


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


def batch_norm2d(x, gamma, beta, mean=None, var=None, eps=1e-5):
    """Per-channel normalisation. x: (N, C, H, W); gamma, beta: (C,).

    With ``mean``/``var`` None the batch statistics are used (training and RSO
    search); otherwise the given (population) statistics (evaluation).
    Returns (out, (xhat, inv_std)); the second item is what the backward needs.
    """
    _check_x(x)
    C = x.shape[1]
    for name, p in (("gamma", gamma), ("beta", beta)):
        if tuple(p.shape) != (C,):
            raise ValueError(f"{name} must have shape ({C},) for x with {C} channels, got {tuple(p.shape)}")
    xp = get_array_module(x)
    if mean is None:
        mean = x.mean(axis=(0, 2, 3))
        var = x.var(axis=(0, 2, 3))
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
