"""Fast kernels: reference kernels of ``functional.py`` computed with less work, and what that needs.

Each function here gives the numbers of a reference kernel (up to float rounding, where the sums are
taken in another order); ``tests/test_fast_kernels.py`` checks every one against that kernel:

==========================================  =========================================================
here                                        equals
==========================================  =========================================================
``conv2d(x, W, b, stride, padding)``        ``functional.conv2d`` (``relu=True``: followed by
                                            ``functional.relu``); on NumPy a few images at a time,
                                            on every core inside ``parallel_cpu()``
``conv_avg_pool(x, W, b, padding, pool)``   ``functional.avg_pool2d(functional.conv2d(...))``
``conv_global_avg(x, W, b, stride, pad)``   ``functional.global_avg_pool2d(functional.conv2d(...))``
``bn_global_avg(x, gamma, beta, eps)``      ``functional.global_avg_pool2d(functional.batch_norm2d(...))``
``global_max(x)``                           ``functional.global_max_pool2d``, bit for bit
``bn_global_max(x, gamma, beta, eps)``      ``global_max(batch_norm(...))``, bit for bit (zeros' signs aside)
``batch_norm``, ``bn_scale_shift``,         ``functional.batch_norm2d`` with each group's statistics
``candidates_bn_scale_shift``               (the last: of the candidates' batch, never made)
``gather_channels(acts, rows, channels)``   ``acts[rows][:, channels]``
``Staged`` (``staged_rows``, ``staged_relu``,  the array it stands for (``acts[rows]``, ``relu(y)``,
``staged_candidates``)                      the 3B batch of candidates)
==========================================  =========================================================

``parallel_cpu()`` (threads, BLAS at one thread), ``Workspace`` (arrays kept between trials) and the
per-thread buffers change no number: they decide where work runs and which memory it reuses.

How the code reaches this module: explicitly. ``layers.Conv2d.forward`` calls ``fast_kernels.conv2d``
and the fast engine calls the folded and staged kernels; ``functional.py`` never calls in here. So the
reference reads as it runs on a GPU (where ``conv2d`` here is ``functional.conv2d``), and a call goes
down one way: layer or engine -> this module -> the backend, never back into the reference's helpers
(this module uses only its public ones: ``conv_geometry``, ``patch_view``, ``weight_matrix``).

Why the CPU convolution is blocked: the full im2col matrix is KH*KW times the input; writing it to
memory and reading it back costs more than the matrix product itself. A few images at a time keep
their patch matrix in the cache, and every core takes a share of the blocks.
"""

import contextlib
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import functional as F
from ._checks import as_pair, check_channels, check_conv
from .backend import get_array_module

CONV_BLOCK_BYTES = 1 << 20     # conv2d on the CPU: the size of one block of the patch matrix
CONV_THREADS = None            # conv2d on the CPU: threads sharing the images; None: one per usable core

# --------------------------------------------------------------------------- threads and BLAS

_threads = threading.local()     # .inside: this thread works for a split; .buffers: see _thread_buffer
_executors = {}                  # thread count -> ThreadPoolExecutor (the calling thread is the other one)
_parallel = {"depth": 0}         # parallel_cpu contexts entered (0: conv2d runs serially)
_blas = []                       # [threadpoolctl controller or None], made on first use


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
    images one BLAS thread is faster than several. The RSO engines search and ``training.evaluate``
    evaluates inside it. It may be nested; the outermost one restores BLAS's thread count.
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


def _relu(x, out):
    """out[...] = relu(x), as ``functional.relu`` gives it (NaN and -0.0 included), through NumPy's
    maximum against an array of zeros (``_zeros``): against the scalar 0 the same loop runs several
    times slower."""
    return np.maximum(x, _zeros(x.shape, x.dtype), out=out)


def relu(x, ws=None, key=None):
    """``functional.relu(x)`` (NumPy), into a Workspace array when ``ws`` and ``key`` are given."""
    out = _take(ws, key, x.shape, x.dtype)
    return _relu(x, np.empty_like(x) if out is None else out)


def _zeros(shape, dtype):
    """Zeros of any shape, a view of this thread's one zero-filled buffer (grown when too small, never
    written): blocks of many shapes share it, where one buffer per shape would crowd ``_thread_buffer``."""
    n = math.prod(shape)                                 # np.prod of a tuple costs ~3 us, paid per block
    z = getattr(_threads, "zeros", None)
    if z is None or z.size < n or z.dtype != dtype:
        z = _threads.zeros = np.zeros(max(n, 0 if z is None or z.dtype != dtype else z.size), dtype=dtype)
    return z[:n].reshape(shape)


def _per_pixel(v, pixels):
    """A per-channel vector v (..., C) repeated for ``pixels`` pixels: (..., pixels*C), to multiply or add
    to images laid out channels-last and flattened. Same numbers; NumPy's loops run faster over long rows
    than over a broadcast row of C numbers."""
    return np.tile(v, (1,) * (v.ndim - 1) + (pixels,))


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


# --------------------------------------------------------------------------- staged inputs, workspaces


class Staged:
    """A batch (N, C, H, W) on the CPU that is never stored whole: ``fill(dst, s, e)`` writes images
    s..e-1, channels-last, into dst. ``conv2d`` copies its input into a small buffer a block of images at
    a time anyway; a gather, a sum or a ReLU done in that copy costs no pass over memory of its own and
    runs on every core. Same numbers as the array."""

    def __init__(self, fill, shape, dtype):
        self.fill, self.shape, self.dtype = fill, tuple(shape), np.dtype(dtype)

    def array(self, out=None):
        """The batch as an (N, C, H, W) array (channels-last in memory; ``out``: (N, H, W, C) to fill)."""
        N, C, H, W = self.shape
        x = np.empty((N, H, W, C), dtype=self.dtype) if out is None else out
        self.fill(x, 0, N)
        return x.transpose(0, 3, 1, 2)


def staged(x):
    """An (N, C, H, W) NumPy array as a Staged batch (its images copied channels-last)."""
    src = x.transpose(0, 2, 3, 1)

    def fill(dst, s, e):
        dst[...] = src[s:e]
    return Staged(fill, x.shape, x.dtype)


def staged_relu(x):
    """relu(x), applied while a convolution copies x."""
    src = x.transpose(0, 2, 3, 1)
    return Staged(lambda dst, s, e: _relu(src[s:e], dst), x.shape, x.dtype)


def staged_rows(acts, rows, channel=None, into=None):
    """acts[rows] (acts: a stored activation); with ``channel``, the fill also copies that channel of
    every image into ``into`` (B, H, W), for the channel delta."""
    src = acts.transpose(0, 2, 3, 1)

    def fill(dst, s, e):
        for i, r in enumerate(rows[s:e]):                  # an image at a time: faster than np.take here
            dst[i] = src[r]
        if channel is not None:
            into[s:e] = dst[..., channel]
    return Staged(fill, (len(rows),) + acts.shape[1:], acts.dtype)


def gather_channels(acts, rows, channels, ws=None, key=None):
    """``acts[rows][:, channels]`` (acts: a stored activation (N, C, H, W)): (B, len(channels), H, W), a
    block of images at a time on every core inside ``parallel_cpu()`` (reading a few channels of a
    channels-last store is a strided walk over all of it, bound by memory latency), into a Workspace
    array when ``ws`` and ``key`` are given."""
    shape = (len(rows), len(channels)) + acts.shape[2:]
    out = _take(ws, key, shape, acts.dtype)
    out = np.empty(shape, dtype=acts.dtype) if out is None else out
    channels = np.asarray(channels)

    def work(blocks):
        for s, e in blocks:
            out[s:e] = acts[rows[s:e, None], channels]
    _run_split(len(rows), 256, work)
    return out


def staged_candidates(y, dy, relu, bn=None):
    """The 3B batch (y + dy[:B], y, y + dy[B:]) of W + dW, W and W - dW, followed by ReLU if ``relu``.
    ``bn``: (scale, shift), each (3, C), from ``candidates_bn_scale_shift``: batch norm with each
    candidate's statistics applied before the ReLU (y and dy channels-last)."""
    B, C, H, W = y.shape
    ys, ds = y.transpose(0, 2, 3, 1), dy.transpose(0, 2, 3, 1)
    if bn is not None:
        scale, shift = (_per_pixel(a, H * W) for a in bn)

    def fill(dst, s, e):
        for g in range(s // B, (e - 1) // B + 1):           # the candidates this block of images spans
            a, b = max(s, g * B), min(e, (g + 1) * B)
            out = dst[a - s:b - s]
            # dy rows: g = 0 -> 0..B-1, g = 2 -> B..2B-1; a ReLU or batch norm goes through a contiguous buffer
            t = _thread_buffer("cand", dst.shape, dst.dtype)[a - s:b - s] if relu or bn else out
            src = ys[a - B:b - B]
            if g != 1:
                src = np.add(ys[a - g * B:b - g * B], ds[a - g * B + g // 2 * B:b - g * B + g // 2 * B], out=t)
            if bn is not None:
                flat = t.reshape(b - a, -1)
                np.multiply(src.reshape(b - a, -1), scale[g], out=flat)
                flat += shift[g]
                src = t
            if relu:
                _relu(src, out)
            elif src is not out:
                out[...] = src
    return Staged(fill, (3 * B,) + y.shape[1:], y.dtype)


class Workspace:
    """Arrays kept from one trial to the next, by name, shape and dtype (the trials of a layer pass have
    the same few shapes; one name may serve two, such as layer m's convolution of one channel for the
    minibatch and for the two candidates).

    On the CPU a new large array is paid for again in page faults when it is first written, a good part
    of a trial's time; reusing them avoids it. ``None`` in place of a workspace: fresh arrays."""

    def __init__(self):
        self.arrays = {}

    def get(self, key, shape, dtype, zero=False):
        k = (key, tuple(shape), np.dtype(dtype).str)
        a = self.arrays.get(k)
        if a is None:
            a = self.arrays[k] = (np.zeros if zero else np.empty)(shape, dtype=dtype)
        return a


def _take(ws, key, shape, dtype):
    return None if ws is None else ws.get(key, shape, dtype)


# --------------------------------------------------------------------------- convolution


def conv2d(x, W, b=None, stride=1, padding=0, out=None, relu=False, ws=None, key=None, add=None):
    """``functional.conv2d(x, W, b, stride, padding)``, plus ``add`` if given, followed by ReLU if
    ``relu``: (N, C_out, OH, OW).

    x: an (N, C_in, H, W) array, or (NumPy) a ``Staged`` batch. ``out``: an (N, OH, OW, C_out) array to
    write the result into (the result is its NCHW view); ``ws``, ``key``: a ``Workspace`` and the name
    of the array to write into instead. ``add``: an (N, C_out, OH, OW) array (channels-last in memory on
    NumPy) added to each block of outputs while it is in the cache. On CuPy this is ``functional.conv2d``
    itself (the whole batch in one product); on NumPy the product runs a block of images at a time (see
    ``_conv_blocks``).
    """
    if get_array_module(W) is not np:
        y = F.conv2d(x.array() if isinstance(x, Staged) else x, W, b, stride, padding)
        if add is not None:
            y = y + add
        if relu:
            y = F.relu(y)
        if out is not None:
            out[...] = y.transpose(0, 2, 3, 1)
            y = out.transpose(0, 3, 1, 2)
        return y
    if isinstance(x, Staged):
        check_channels(x.shape, W)
    else:
        check_conv(x, W, b)
        x = staged(x)
    C_out, _, KH, KW = W.shape
    OH, OW = F.conv_geometry(x.shape, KH, KW, stride, padding)
    shape = (x.shape[0], OH, OW, C_out)
    if out is None:
        out = _take(ws, key, shape, x.dtype)
    if out is None:
        out = np.empty(shape, dtype=x.dtype)
    elif out.shape != shape or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {x.dtype.name} array of shape {shape}, "
                         f"got {out.dtype.name} {out.shape}")
    Wm = np.ascontiguousarray(F.weight_matrix(W).T)        # (KH*KW*C_in, C_out)
    block = max(1, CONV_BLOCK_BYTES // (OH * OW * Wm.shape[0] * x.dtype.itemsize))
    bias = None if b is None else np.asarray(b, dtype=x.dtype)
    if add is not None and (add.shape != (shape[0], C_out, OH, OW) or not channels_last(add)):
        raise ValueError(f"add must be a channels-last array of shape {(shape[0], C_out, OH, OW)}, got {add.shape}")
    add2 = None if add is None else add.transpose(0, 2, 3, 1).reshape(-1, C_out)
    _run_split(x.shape[0], block, lambda blocks: _conv_blocks(x, blocks, Wm, out, KH, KW, stride, padding,
                                                              min(block, x.shape[0]), bias, relu, add2))
    return out.transpose(0, 3, 1, 2)


def _conv_blocks(x, blocks, Wm, out, KH, KW, stride, padding, n, bias, relu, add=None):
    """The blocks of images (start, stop) of ``conv2d`` of the Staged batch x into out (N, OH, OW, C_out);
    n: the largest block.

    Per block: x.fill() lays the images out padded and channels-last in a small buffer, their patch
    matrix (im2col) is copied from it, and one matrix product writes the block's outputs. The buffers
    are the thread's own and are kept between calls (their zero border stays zero), so nothing large is
    allocated and everything a block touches stays in the cache.
    """
    _, C, H, W = x.shape
    ph, pw = as_pair(padding, "padding")
    K, C_out = Wm.shape
    OH, OW = out.shape[1:3]
    xh = _thread_buffer("pad", (n, H + 2 * ph, W + 2 * pw, C), out.dtype, zero=True)
    inner = xh[:, ph:ph + H, pw:pw + W, :]
    # With few input channels a patch row is a few numbers long and copying it row by row is slow:
    # then the matrix is built transposed, one kernel tap at a time (rows of n*OH*OW numbers).
    patch_matrix = (_by_tap if KW * C < 8 else _by_row)(xh, KH, KW, stride, OH, OW)
    out2, rows = out.reshape(-1, C_out), OH * OW           # rows: output pixels (matrix rows) per image
    for s, e in blocks:
        x.fill(inner if e - s == n else inner[:e - s], s, e)
        o = out2[s * rows:e * rows]
        np.matmul(patch_matrix(e - s), Wm, out=o)
        if bias is not None:
            o += bias
        if add is not None:
            o += add[s * rows:e * rows]
        if relu:
            _relu(o, o)


def _by_row(xh, KH, KW, stride, OH, OW):
    """A function m -> the patch matrix (m*OH*OW, KH*KW*C) of the first m images of the buffer xh: one
    copy of their patch view into this thread's buffer (the views of a whole block are made once)."""
    n = xh.shape[0]
    col = _thread_buffer("col", (n, OH, OW, KH, KW * xh.shape[3]), xh.dtype)
    patches, full = F.patch_view(xh, KH, KW, stride, OH, OW), col.reshape(n * OH * OW, -1)

    def matrix(m):
        if m == n:
            col[...] = patches
            return full
        col[:m] = patches[:m]                              # the last, partial block
        return col[:m].reshape(m * OH * OW, -1)
    return matrix


def _by_tap(xh, KH, KW, stride, OH, OW):
    """The same matrices built transposed, (KH*KW*C, m*OH*OW), one kernel tap (ki, kj) at a time, in the
    (kh, kw, c) order of ``functional.weight_matrix``; each returned as its transpose (a view)."""
    n, C = xh.shape[0], xh.shape[3]
    sh, sw = as_pair(stride, "stride")
    colT = _thread_buffer("colT", (KH * KW * C, n * OH * OW), xh.dtype)

    def matrix(m):
        A = colT[:, :m * OH * OW]
        for ki in range(KH):
            for kj in range(KW):
                t = (ki * KW + kj) * C
                A[t:t + C].reshape(C, m, OH, OW)[...] = \
                    xh[:m, ki:ki + sh * OH:sh, kj:kj + sw * OW:sw].transpose(3, 0, 1, 2)
        return A.T
    return matrix


# --------------------------------------------------------------------------- folded convolution + pooling


def _tap_slice(k, stride, padding, out_size, in_size):
    """The input rows (or columns) that kernel tap k sees over all output positions, padding dropped
    (it is zero): rows i*stride + k - padding, i = 0 .. out_size-1, that lie inside the input."""
    i0 = max(0, -((k - padding) // stride))                      # first i with i*stride + k - padding >= 0
    i1 = min(out_size - 1, (in_size - 1 - k + padding) // stride)
    return slice(i0 * stride + k - padding, i1 * stride + k - padding + 1, stride)


def conv_global_avg(x, W, b=None, stride=1, padding=0, ws=None, key=None):
    """global_avg_pool2d(conv2d(x, W, b, stride, padding)) without the convolution: (N, C_out).

    Both steps are linear, so together they are one dense layer on the flattened input: input pixel
    (c, h, w) reaches output o through every tap (ki, kj) whose window covers it, with weight
    W[o, c, ki, kj] / (OH*OW). The effective (C*H*W, C_out) matrix costs less than one image's convolution.
    Same numbers up to float rounding.
    """
    if isinstance(x, Staged):
        x = x.array(_take(ws, key, (x.shape[0],) + x.shape[2:] + x.shape[1:2], x.dtype))
    xp = get_array_module(x)
    C_out, _, KH, KW = W.shape
    N, _, H, Wd = x.shape
    OH, OW = F.conv_output_size(H, KH, stride, padding), F.conv_output_size(Wd, KW, stride, padding)
    rows, cols = xp.zeros((H, KH), dtype=W.dtype), xp.zeros((Wd, KW), dtype=W.dtype)
    for k in range(KH):
        rows[_tap_slice(k, stride, padding, OH, H), k] = 1                # rows[h, ki]: tap ki sees row h
    for k in range(KW):
        cols[_tap_slice(k, stride, padding, OW, Wd), k] = 1
    if x.transpose(0, 2, 3, 1).flags.c_contiguous:        # channels-last in memory: flatten as (h, w, c)
        W_eff = xp.einsum("ocij,hi,wj->hwco", W, rows, cols, optimize=xp is np) / (OH * OW)
        x = x.transpose(0, 2, 3, 1)
    else:
        W_eff = xp.einsum("ocij,hi,wj->chwo", W, rows, cols, optimize=xp is np) / (OH * OW)
    out = x.reshape(N, -1) @ W_eff.reshape(-1, C_out)
    return out + b if b is not None else out


def conv_avg_pool(x, W, b=None, padding=0, pool=2, pool_stride=None, ws=None, key=None, out=None, relu=False,
                  add=None):
    """avg_pool2d(conv2d(x, W, b, 1, padding), pool, pool_stride) as one strided convolution.

    Both steps are linear: output (i, j) averages the convolution at rows i*ps + a, columns j*ps + c
    (a, c < pool), so it is one convolution of stride ps with the (KH + pool - 1) x (KW + pool - 1) kernel
    W' = sum over (a, c) of W shifted by (a, c), / pool^2. For a 3x3 kernel and 2x2 pooling that is 16
    taps per pooled output instead of 4 x 9, and no pooling pass. Same numbers up to float rounding.
    ``out``, ``relu``, ``ws``, ``key``, ``add``: as in ``conv2d``.
    """
    xp = get_array_module(W)
    ps = pool if pool_stride is None else pool_stride
    C_out, C_in, KH, KW = W.shape
    W2 = xp.zeros((C_out, C_in, KH + pool - 1, KW + pool - 1), dtype=W.dtype)
    for a in range(pool):
        for c in range(pool):
            W2[:, :, a:a + KH, c:c + KW] += W
    return conv2d(x, W2 * W.dtype.type(1.0 / (pool * pool)), b, ps, padding, out, relu, ws, key, add)


# --------------------------------------------------------------------------- batch norm


def _channel_sums(v, image_rows):
    """Per-channel mean and mean square of v (G, M, C) (C contiguous; ``image_rows`` rows per image):
    (G, C) float64 each. Float32 sums over blocks of a few thousand rows (whole images), then float64
    across blocks: as accurate as ``functional.batch_stats``, and fewer passes over memory."""
    G, M, C = v.shape
    n = _block_rows(M, image_rows)
    p = v.reshape(G * (M // n), n, C)
    return _block_sums(G, M, n, C, lambda i: p[i], v.dtype)


def _block_rows(M, image_rows):
    """Rows per block of ``_channel_sums`` for M rows: whole images, a few thousand rows, dividing M."""
    k = max(1, 8192 // image_rows)                       # images per block: a divisor of the batch
    while (M // image_rows) % k:
        k -= 1
    return k * image_rows


def _block_sums(G, M, n, C, block, dtype):
    """``_channel_sums`` of G groups of M rows given by their blocks of n rows: block(i) -> (n, C) for
    i = g * (M // n) + b. The blocks are summed on every core inside ``parallel_cpu()``."""
    count = G * (M // n)
    s1, s2 = np.empty((2, count, C), dtype=dtype)
    ones = np.ones(n, dtype=dtype)

    def work(claimed):
        for s, e in claimed:
            for i in range(s, e):
                p = block(i)
                np.matmul(ones, p, out=s1[i])            # a matrix product sums fastest
                s2[i] = np.einsum("nc,nc->c", p, p)
    _run_split(count, 1, work)
    s1 = s1.reshape(G, -1, C).sum(axis=1, dtype=np.float64)
    s2 = s2.reshape(G, -1, C).sum(axis=1, dtype=np.float64)
    return s1 / M, s2 / M


def channels_last(x):
    """Whether x (N, C, H, W) is stored channels-last (NHWC) in one block, as conv2d writes it (an array
    of another number of dimensions: no)."""
    return get_array_module(x) is np and x.ndim == 4 and x.transpose(0, 2, 3, 1).flags.c_contiguous


def bn_scale_shift(x, gamma, beta, eps, groups=1):
    """Batch norm with the batch statistics of each of ``groups`` consecutive equal blocks of x (NumPy,
    channels-last) as x * scale[g] + shift[g]: (scale, shift), each (groups, C) in x's dtype, with
    scale = gamma / sqrt(var + eps) and shift = beta - mean * scale."""
    N, C, H, W = x.shape
    mean, sq = _channel_sums(x.transpose(0, 2, 3, 1).reshape(groups, -1, C), H * W)
    return _scale_shift(mean, sq, gamma, beta, eps, x.dtype)


def candidates_bn_scale_shift(y, dy, gamma, beta, eps):
    """``bn_scale_shift`` of the 3B batch (y + dy[:B], y, y + dy[B:]) of ``staged_candidates`` with
    groups=3, without making that batch: each block of rows is summed right after it is added up in a
    small buffer. y (B, C, H, W) and dy (2B, C, H, W) channels-last; same numbers."""
    B, C, H, W = y.shape
    M = B * H * W
    ys, ds = y.transpose(0, 2, 3, 1).reshape(M, C), dy.transpose(0, 2, 3, 1).reshape(2 * M, C)
    n = _block_rows(M, H * W)

    def block(i):
        g, r = divmod(i * n, M)                            # candidate g, its rows r .. r+n-1
        if g == 1:
            return ys[r:r + n]
        t = _thread_buffer("cand_sums", (n, C), y.dtype)
        return np.add(ys[r:r + n], ds[g // 2 * M + r:g // 2 * M + r + n], out=t)
    mean, sq = _block_sums(3, M, n, C, block, y.dtype)
    return _scale_shift(mean, sq, gamma, beta, eps, y.dtype)


def _scale_shift(mean, sq, gamma, beta, eps, dtype):
    """(scale, shift) of batch norm from the per-channel mean and mean square (float64)."""
    mean32 = mean.astype(dtype)
    var32 = np.maximum(sq - mean * mean, 0.0).astype(dtype)
    scale = (1.0 / np.sqrt(var32 + dtype.type(eps))) * gamma
    return scale, beta - mean32 * scale


def bn_global_avg(x, gamma, beta, eps, groups=1):
    """global_avg_pool2d(batch_norm(x_g)) with the batch statistics of each of ``groups`` consecutive
    equal blocks x_g of x (NumPy, channels-last): (N, C). Batch norm is affine per channel, so it is
    applied to the pooled channels; the normalised images are never made. Same numbers up to float
    rounding."""
    N, C, H, W = x.shape
    scale, shift = bn_scale_shift(x, gamma, beta, eps, groups)
    pooled = np.ones(H * W, dtype=x.dtype) @ x.transpose(0, 2, 3, 1).reshape(N, H * W, C)
    pooled *= x.dtype.type(1.0 / (H * W))
    return (pooled.reshape(groups, -1, C) * scale[:, None] + shift[:, None]).reshape(N, C)


def global_max(x):
    """``functional.global_max_pool2d(x)`` for x (N, C, H, W) stored channels-last (NumPy), bit for bit:
    the maximum over the pixels as a tree of elementwise maxima of the two halves of each image's pixels
    (contiguous rows of C values), where NumPy's ``max`` over the pixel axes of this layout runs an inner
    loop of C elements per pixel and takes about three times as long."""
    N, C, H, W = x.shape
    return _tree(x.transpose(0, 2, 3, 1).reshape(N, H * W, C), np.maximum)


def _tree(a, op):
    """op (np.maximum, np.minimum) over axis 1 of a (n, P, C): a tree of op of the two halves, (n, C)."""
    while a.shape[1] > 1:
        h = a.shape[1] // 2
        out = op(a[:, :h], a[:, h:2 * h])
        if a.shape[1] % 2:                                 # the odd pixel out joins the first
            op(out[:, 0], a[:, 2 * h], out=out[:, 0])
        a = out
    return a[:, 0]


def bn_global_max(x, gamma, beta, eps, groups=1):
    """global_max_pool2d(batch_norm(x_g)) with the batch statistics of each of ``groups`` consecutive
    equal blocks x_g of x (NumPy, channels-last): (N, C), the numbers of ``global_max(batch_norm(...))``
    without the normalised images.

    ``batch_norm`` maps a pixel v of channel c to fl(fl(v * scale_c) + shift_c), and float rounding is
    monotone: where scale_c > 0 the largest normalised pixel is the normalised largest pixel, where
    scale_c < 0 the normalised smallest. So only the maxima (and, for a channel with a negative scale,
    the minima) of x are taken, image by image on every core inside ``parallel_cpu()``, and normalised.
    Equal to the long way bit for bit, up to the sign of a zero (which compares equal); a scale of
    exactly 0 takes the long way."""
    N, C, H, W = x.shape
    scale, shift = bn_scale_shift(x, gamma, beta, eps, groups)
    if not scale.all():
        return global_max(batch_norm(x, gamma, beta, eps, groups))
    negative = scale < 0                                   # (groups, C)
    a = x.transpose(0, 2, 3, 1).reshape(N, H * W, C)
    hi = np.empty((N, C), dtype=x.dtype)
    lo = np.empty((N, C), dtype=x.dtype) if negative.any() else None

    def work(blocks):
        for s, e in blocks:
            hi[s:e] = _tree(a[s:e], np.maximum)
            if lo is not None:
                lo[s:e] = _tree(a[s:e], np.minimum)
    _run_split(N, max(1, CONV_BLOCK_BYTES // (H * W * C * x.dtype.itemsize)), work)
    m = hi.reshape(groups, -1, C)
    if lo is not None:
        m = np.where(negative[:, None], lo.reshape(groups, -1, C), m)
    out = m * scale[:, None]
    out += shift[:, None]
    return out.reshape(N, C)


def staged_bn_relu(x, scale, shift):
    """relu(x * scale[g] + shift[g]) for the images of group g (``bn_scale_shift``), applied while a
    convolution copies x: batch norm and ReLU cost no pass over memory of their own."""
    N, C, H, W = x.shape
    src, B = x.transpose(0, 2, 3, 1).reshape(N, H * W * C), N // scale.shape[0]
    scale, shift = _per_pixel(scale, H * W), _per_pixel(shift, H * W)

    def fill(dst, s, e):
        tmp = _thread_buffer("bn_relu", dst.shape, dst.dtype)
        flat = tmp.reshape(tmp.shape[0], -1)
        for g in range(s // B, (e - 1) // B + 1):           # the groups this block of images spans
            a, b = max(s, g * B), min(e, (g + 1) * B)
            t = flat[a - s:b - s]                           # contiguous: numpy's loops run faster there
            np.multiply(src[a:b], scale[g], out=t)
            t += shift[g]
            _relu(tmp[a - s:b - s], dst[a - s:b - s])
    return Staged(fill, x.shape, x.dtype)


def batch_norm(x, gamma, beta, eps, groups=1, ws=None, key=None):
    """``functional.batch_norm2d(x_g, gamma, beta, eps=eps)[0]`` with the batch statistics of each of
    ``groups`` consecutive equal blocks x_g of x (N, C, H, W), the blocks concatenated: (N, C, H, W).

    On NumPy, for x stored channels-last (as conv2d writes it): the statistics from the channel sums of
    the (N*H*W, C) matrix, then out = x * scale + shift with scale = gamma / sqrt(var + eps) and
    shift = beta - mean * scale, one pass. Same numbers up to float rounding. Otherwise (CuPy, other
    layouts) the reference itself, block by block. ``ws``, ``key``: a Workspace array for the output.
    """
    N, C, H, W = x.shape
    B = N // groups
    if not channels_last(x):
        return get_array_module(x).concatenate([F.batch_norm2d(x[k * B:(k + 1) * B], gamma, beta, eps=eps)[0]
                                                for k in range(groups)])
    v = x.transpose(0, 2, 3, 1).reshape(groups, B * H * W, C)
    scale, shift = bn_scale_shift(x, gamma, beta, eps, groups)
    out = _take(ws, key, (N, H, W, C), x.dtype)
    out = np.empty((N, H, W, C), dtype=x.dtype) if out is None else out
    o = out.reshape(groups, B, H * W * C)
    np.multiply(v.reshape(groups, B, H * W * C), _per_pixel(scale, H * W)[:, None], out=o)
    o += _per_pixel(shift, H * W)[:, None]
    return out.transpose(0, 3, 1, 2)
