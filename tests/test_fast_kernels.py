"""Each fast kernel against the reference kernel it stands for (``functional.py``), and against an
independent oracle (scipy.signal.correlate or plain loops) where one exists."""

import contextlib

import numpy as np
import pytest

from rso_np import fast_kernels as FK
from rso_np import functional as F
from rso_np.backend import get_array_module, to_numpy

from .test_functional import BAD_CONV_INPUTS, CONV_CASES, conv_arrays, conv_scipy, on, rel_err


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_conv2d_vs_reference_and_scipy(xp, case, bias, rng):
    x, W, b, s, p = conv_arrays(case, bias, rng)
    args = on(xp, x, W, b, s, p)
    out = FK.conv2d(*args)
    assert get_array_module(out) is xp and out.dtype == xp.float32
    assert rel_err(out, conv_scipy(x, W, b, s, p)) < 1e-5, "fast_kernels.conv2d vs scipy.signal.correlate"
    assert rel_err(out, to_numpy(F.conv2d(*args))) < 1e-5, "fast_kernels.conv2d vs functional.conv2d"


@pytest.mark.parametrize("channels", [1, 3])          # patch matrix built tap by tap / row by row
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("block_images", [1, 2, 3])
def test_conv2d_in_blocks(block_images, threads, channels, rng, monkeypatch):
    """On the CPU conv2d multiplies a few images at a time, the threads taking a share of the blocks
    each: every block and share, the last partial ones included, must match the oracle."""
    x = rng.standard_normal((7, channels, 9, 8)).astype(np.float32)
    W = rng.standard_normal((4, channels, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    per_image = 9 * 8 * 9 * channels * 4                 # OH*OW*KH*KW*C_in float32 numbers
    monkeypatch.setattr(FK, "CONV_BLOCK_BYTES", block_images * per_image)
    monkeypatch.setattr(FK, "CONV_THREADS", threads)
    with FK.parallel_cpu():
        out = FK.conv2d(x, W, b, 1, 1)
    assert rel_err(out, conv_scipy(x, W, b, 1, 1)) < 1e-5
    assert rel_err(out, F.conv2d(x, W, b, 1, 1)) < 1e-5


def test_parallel_cpu_sets_blas_to_one_thread_and_back(rng, monkeypatch):
    """Inside parallel_cpu (nested too) BLAS runs one thread; afterwards it has its own count back."""
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    before = blas_threads()
    monkeypatch.setattr(FK, "CONV_THREADS", 2)
    monkeypatch.setattr(FK, "CONV_BLOCK_BYTES", 1)
    x = rng.standard_normal((4, 2, 6, 6)).astype(np.float32)
    with FK.parallel_cpu():
        assert set(blas_threads()) == {1}
        with FK.parallel_cpu():
            FK.conv2d(x, rng.standard_normal((3, 2, 3, 3)).astype(np.float32), None, 1, 1)
        assert set(blas_threads()) == {1}
    assert blas_threads() == before


def test_staged_inputs_equal_their_arrays():
    """Each Staged batch, filled over blocks that split it anywhere, equals the array it stands for."""
    rng = np.random.default_rng(2)
    acts = np.empty((20, 5, 4, 3), np.float32).transpose(0, 3, 1, 2)     # stored channels-last
    acts[...] = rng.standard_normal(acts.shape)
    rows = rng.permutation(20)[:7]
    y = rng.standard_normal((7, 3, 5, 4)).astype(np.float32)
    dy = rng.standard_normal((14, 3, 5, 4)).astype(np.float32)
    into = np.zeros((7, 5, 4), np.float32)
    cases = [
        (FK.staged_rows(acts, rows, 1, into), acts[rows]),
        (FK.staged_relu(y), np.maximum(y, 0)),
        (FK.staged(y), y),
        (FK.staged_candidates(y, dy, False), np.concatenate([y + dy[:7], y, y + dy[7:]])),
        (FK.staged_candidates(y, dy, True), np.maximum(np.concatenate([y + dy[:7], y, y + dy[7:]]), 0)),
    ]
    for staged, ref in cases:
        assert staged.shape == ref.shape
        assert np.array_equal(staged.array(), ref)
        N, C, H, W = ref.shape
        got = np.empty((N, H, W, C), np.float32)
        cuts = [0, 2, 3, 8, 13, N] if N > 13 else [0, 2, 3, N]
        for s, e in zip(cuts[:-1], cuts[1:]):                 # blocks across the candidates' borders
            staged.fill(got[s:e], s, e)
        assert np.array_equal(got.transpose(0, 3, 1, 2), ref)
    assert np.array_equal(into, acts[rows, 1])                # the channel copied on the side


def test_conv2d_staged_out_bias_relu(monkeypatch):
    """conv2d of a Staged batch with a bias, ReLU and an output array: relu(conv2d(x) + b), written into
    out, block by block."""
    monkeypatch.setattr(FK, "CONV_BLOCK_BYTES", 4 * 16 * 27 * 4)   # 4 images a block: 6 = 4 + 2
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 3, 7, 7)).astype(np.float32)
    W, b = rng.standard_normal((5, 3, 3, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    out = np.empty((6, 4, 4, 5), np.float32)
    got = FK.conv2d(FK.staged(x), W, b, 2, 1, out=out, relu=True)
    ref = np.maximum(F.conv2d_naive(x.astype(np.float64), W, b, 2, 1), 0)
    assert np.shares_memory(got, out) and np.abs(got - ref).max() < 1e-5
    assert np.abs(got - F.relu(F.conv2d(x, W, b, 2, 1))).max() < 1e-5
    with pytest.raises(ValueError, match="out must be a C-contiguous float32 array of shape"):
        FK.conv2d(FK.staged(x), W, b, 1, 1, out=out)
    # add: a channels-last array added to each block before the ReLU, bit for bit as adding it after
    add = rng.standard_normal((6, 4, 4, 5)).astype(np.float32).transpose(0, 3, 1, 2)
    plain = FK.conv2d(FK.staged(x), W, b, 2, 1)
    with FK.parallel_cpu():
        got = FK.conv2d(FK.staged(x), W, b, 2, 1, add=add, relu=True)
    assert np.array_equal(got, np.maximum(plain + add, 0))
    assert np.abs(got - np.maximum(F.conv2d_naive(x.astype(np.float64), W, b, 2, 1) + add, 0)).max() < 1e-5
    with pytest.raises(ValueError, match="add must be a channels-last array of shape"):
        FK.conv2d(FK.staged(x), W, b, 2, 1, add=np.ascontiguousarray(add))


def test_workspace_keeps_arrays():
    """A workspace hands back the same array for the same name, shape and dtype, a new one otherwise,
    and keeps both when one name alternates between two shapes (as the channel delta's convolution of
    one channel does, for the minibatch and for the candidates); conv2d writes into it."""
    ws = FK.Workspace()
    a = ws.get("k", (2, 3), np.float32)
    b = ws.get("k", (3, 2), np.float32)
    assert ws.get("k", (2, 3), np.float32) is a and b is not a and ws.get("k", (3, 2), np.float32) is b
    assert ws.get("k", (2, 3), np.float64) is not a
    x = np.random.default_rng(0).standard_normal((2, 1, 5, 5)).astype(np.float32)
    W = np.ones((2, 1, 3, 3), np.float32)
    y = FK.conv2d(x, W, ws=ws, key="conv")
    assert np.shares_memory(y, ws.arrays["conv", (2, 3, 3, 2), "<f4"]) and np.abs(y - F.conv2d(x, W)).max() < 1e-5


@pytest.mark.parametrize("bad,match", BAD_CONV_INPUTS)
def test_conv2d_bad_input(bad, match):
    """The same clear errors as functional.conv2d."""
    with pytest.raises(ValueError, match=match):
        FK.conv2d(bad, np.zeros((4, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="x has 2 channels but W expects C_in=3"):
        FK.conv2d(FK.staged(np.zeros((2, 2, 5, 5), np.float32)), np.zeros((4, 3, 3, 3), np.float32))


@pytest.mark.parametrize("shape,k,stride,padding", [
    ((5, 3, 7, 7), 3, 1, 1), ((4, 2, 9, 8), 3, 2, 1), ((3, 2, 10, 11), 5, 3, 2), ((2, 2, 6, 7), 2, 1, 0)])
def test_conv_global_avg_vs_loops(shape, k, stride, padding):
    """Convolution + global average pooling folded into one product, against the plain-loop convolution
    and against the reference kernels in turn."""
    rng = np.random.default_rng(0)
    x, W, b = rng.standard_normal(shape), rng.standard_normal((4, shape[1], k, k)), rng.standard_normal(4)
    ref = F.conv2d_naive(x, W, b, stride, padding).mean(axis=(2, 3))
    got = FK.conv_global_avg(x, W, b, stride, padding)
    assert np.abs(got - ref).max() < 1e-12
    assert np.abs(got - F.global_avg_pool2d(F.conv2d(x, W, b, stride, padding))).max() < 1e-12


@pytest.mark.parametrize("shape,k,padding,pool,pool_stride", [
    ((3, 4, 14, 14), 3, 1, 2, None), ((2, 3, 9, 11), 3, 1, 2, None), ((2, 2, 10, 9), 3, 0, 3, 2),
    ((2, 2, 8, 8), 5, 2, 2, 1)])
def test_conv_avg_pool_vs_loops(shape, k, padding, pool, pool_stride):
    """Convolution + average pooling as one strided convolution, against plain loops for both steps and
    against the reference kernels in turn."""
    rng = np.random.default_rng(1)
    x, W, b = rng.standard_normal(shape), rng.standard_normal((3, shape[1], k, k)), rng.standard_normal(3)
    conv = F.conv2d_naive(x, W, b, 1, padding)
    ps = pool if pool_stride is None else pool_stride
    OH, OW = (conv.shape[2] - pool) // ps + 1, (conv.shape[3] - pool) // ps + 1
    ref = np.array([[[[conv[n, o, i * ps:i * ps + pool, j * ps:j * ps + pool].mean() for j in range(OW)]
                      for i in range(OH)] for o in range(3)] for n in range(shape[0])])
    out = FK.conv_avg_pool(x, W, b, padding, pool, pool_stride)
    assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-12
    assert np.abs(out - F.avg_pool2d(F.conv2d(x, W, b, 1, padding), pool, pool_stride)).max() < 1e-12


@pytest.mark.parametrize("groups", [1, 3])
def test_bn_global_avg_vs_reference(groups):
    """Global average pooling after batch norm (each group's statistics), computed as batch norm of the
    pooled channels: against functional.batch_norm2d then global_avg_pool2d, and float64 formulas."""
    rng = np.random.default_rng(6)
    B, C, H, W = 5, 4, 7, 7
    x = (rng.standard_normal((groups * B, H, W, C)) * 2 - 1).astype(np.float32).transpose(0, 3, 1, 2)
    g, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    got = FK.bn_global_avg(x, g, b, 1e-3, groups)
    ref = np.concatenate([F.global_avg_pool2d(F.batch_norm2d(x[k * B:(k + 1) * B], g, b, eps=1e-3)[0])
                          for k in range(groups)])
    x64 = x.astype(np.float64).reshape(groups, B, C, H, W)
    m, v = x64.mean(axis=(1, 3, 4), keepdims=True), x64.var(axis=(1, 3, 4), keepdims=True)
    exact = ((x64 - m) / np.sqrt(v + 1e-3) * g[:, None, None] + b[:, None, None]).mean(axis=(3, 4))
    assert got.shape == (groups * B, C)
    assert np.abs(got - ref).max() < 1e-5 and np.abs(got - exact.reshape(-1, C)).max() < 1e-5


@pytest.mark.parametrize("groups,H,W", [(1, 7, 7), (3, 7, 7), (2, 1, 1), (3, 2, 3), (1, 5, 4)])
def test_bn_global_max_bit_for_bit(groups, H, W, monkeypatch):
    """Global max pooling after batch norm (each group's statistics), from each channel's maxima, or minima
    where its scale is negative: the numbers of global_max(batch_norm(...)) bit for bit, on every core and
    serially; against functional.batch_norm2d then global_max_pool2d, and a float64 formula."""
    rng = np.random.default_rng(9)
    B, C = 40, 6
    x = (rng.standard_normal((groups * B, H, W, C)) * 3).astype(np.float32).transpose(0, 3, 1, 2)
    g = np.array([1.5, -0.7, 0.2, -2.0, 1.0, 0.9], dtype=np.float32)     # negative scales: the minima
    b = rng.standard_normal(C).astype(np.float32)
    long_way = FK.global_max(FK.batch_norm(x, g, b, 1e-3, groups))
    serial = FK.bn_global_max(x, g, b, 1e-3, groups)
    monkeypatch.setattr(FK, "CONV_BLOCK_BYTES", 7 * H * W * C * 4)      # blocks of 7 images, shared out
    with FK.parallel_cpu():
        got = FK.bn_global_max(x, g, b, 1e-3, groups)
    assert got.shape == (groups * B, C) and got.dtype == np.float32
    assert np.array_equal(got, long_way) and np.array_equal(serial, long_way)
    ref = np.concatenate([F.global_max_pool2d(F.batch_norm2d(x[k * B:(k + 1) * B], g, b, eps=1e-3)[0])
                          for k in range(groups)])
    x64 = x.astype(np.float64).reshape(groups, B, C, H, W)
    m, v = x64.mean(axis=(1, 3, 4), keepdims=True), x64.var(axis=(1, 3, 4), keepdims=True)
    exact = ((x64 - m) / np.sqrt(v + 1e-3) * g[:, None, None] + b[:, None, None]).max(axis=(3, 4))
    assert np.abs(got - ref).max() < 1e-5 and np.abs(got - exact.reshape(-1, C)).max() < 1e-5
    g[2] = 0                                               # a zero scale: the long way, the same numbers
    long_way = FK.global_max(FK.batch_norm(x, g, b, 1e-3, groups))
    assert np.array_equal(FK.bn_global_max(x, g, b, 1e-3, groups), long_way)


@pytest.mark.parametrize("H,W", [(7, 7), (1, 1), (2, 3), (5, 4)])
def test_global_max_bit_for_bit(H, W):
    """Global max pooling of a channels-last array as a tree of maxima: functional.global_max_pool2d's
    numbers exactly, odd pixel counts, infinities and NaN included, and the loops' maxima."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, H, W, 5)).astype(np.float32).transpose(0, 3, 1, 2)
    x[0, 0, 0, 0], x[1, 1, -1, -1], x[2, 2, 0, -1] = np.inf, -np.inf, np.nan
    got = FK.global_max(x)
    assert got.shape == (6, 5) and got.dtype == np.float32
    assert np.array_equal(got, F.global_max_pool2d(x), equal_nan=True)
    loops = np.array([[max(x[n, c].ravel()) if not np.isnan(x[n, c]).any() else np.nan for c in range(5)]
                      for n in range(6)], dtype=np.float32)
    assert np.array_equal(got, loops, equal_nan=True)


def test_gather_channels():
    """A few channels of a minibatch of a stored (channels-last) activation, gathered a block of images at
    a time on every core into a workspace array: acts[rows][:, channels] exactly."""
    rng = np.random.default_rng(10)
    acts = rng.standard_normal((1000, 4, 4, 5)).astype(np.float32).transpose(0, 3, 1, 2)
    rows = rng.permutation(1000)[:600]                     # 3 blocks of images
    ws = FK.Workspace()
    for channels in ([2], [0, 3]):
        with FK.parallel_cpu():
            got = FK.gather_channels(acts, rows, channels, ws, "h")
        assert np.array_equal(got, acts[rows][:, channels])
        assert got is ws.get("h", (600, len(channels), 4, 4), np.float32)
    assert np.array_equal(FK.gather_channels(acts, rows, [4]), acts[rows][:, [4]])


def test_relu_bit_for_bit():
    """The ReLU of the staged kernels (maximum against an array of zeros) gives functional.relu's bits,
    NaN, infinities and -0.0 included."""
    x = np.random.default_rng(9).standard_normal(1000).astype(np.float32)
    x[:4] = [-0.0, np.nan, np.inf, -np.inf]
    out = np.empty_like(x)
    FK._relu(x, out)
    assert np.array_equal(out.view(np.int32), F.relu(x).view(np.int32))
    ws = FK.Workspace()                                  # the public one: into a workspace array, kept
    first = FK.relu(x.reshape(10, 1, 10, 10), ws, "r")
    assert np.array_equal(first.view(np.int32), F.relu(x).reshape(10, 1, 10, 10).view(np.int32))
    assert FK.relu(-x.reshape(10, 1, 10, 10), ws, "r") is first
    assert np.array_equal(first.view(np.int32), F.relu(-x).reshape(10, 1, 10, 10).view(np.int32))
    assert np.array_equal(FK.relu(x).view(np.int32), F.relu(x).view(np.int32))    # no workspace: fresh


@pytest.mark.parametrize("parallel", [False, True])
def test_candidates_batch_norm_without_the_batch(parallel):
    """The candidates' batch norm (each candidate's statistics) from y and dy, never making the 3B batch:
    the same numbers as bn_scale_shift and staged_bn_relu on that batch, and the reference batch norm
    and ReLU, candidate by candidate. Several blocks per candidate, summed on every core or serially."""
    rng = np.random.default_rng(5)
    B, C, H, W = 24, 3, 32, 32                                 # blocks of 8 images: 3 per candidate
    y = (rng.standard_normal((B, H, W, C)) * 2 + 1).astype(np.float32).transpose(0, 3, 1, 2)
    dy = rng.standard_normal((2 * B, H, W, C)).astype(np.float32).transpose(0, 3, 1, 2)
    g, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    yc = np.ascontiguousarray(np.concatenate([y + dy[:B], y, y + dy[B:]]).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    with FK.parallel_cpu() if parallel else contextlib.nullcontext():
        norm = FK.candidates_bn_scale_shift(y, dy, g, b, 1e-3)
        same = FK.bn_scale_shift(yc, g, b, 1e-3, 3)
        staged = FK.staged_candidates(y, dy, True, norm)
        got = staged.array()
    assert all(np.array_equal(a, e) for a, e in zip(norm, same))
    assert np.array_equal(got, FK.staged_bn_relu(yc, *same).array())
    ref = np.concatenate([F.relu(F.batch_norm2d(yc[k * B:(k + 1) * B], g, b, eps=1e-3)[0]) for k in range(3)])
    assert np.abs(got - ref).max() < 1e-5
    out = np.empty((3 * B, H, W, C), np.float32)
    for s, e in ((0, 5), (5, 30), (30, 3 * B)):                 # blocks across the candidates' borders
        staged.fill(out[s:e], s, e)
    assert np.array_equal(out.transpose(0, 3, 1, 2), got)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("channels", [1, 5])
def test_batch_norm_vs_reference(groups, channels):
    """Batch norm with each group's own statistics (channels-last data, as a conv writes it), and staged
    with the ReLU after it: against functional.batch_norm2d group by group, and against float64 formulas."""
    rng = np.random.default_rng(4)
    B, H, W = 6, 5, 7
    x = (rng.standard_normal((groups * B, H, W, channels)) * 3 + 1).astype(np.float32).transpose(0, 3, 1, 2)
    g, b = rng.standard_normal(channels).astype(np.float32), rng.standard_normal(channels).astype(np.float32)
    ref = np.concatenate([F.batch_norm2d(x[k * B:(k + 1) * B], g, b, eps=1e-3)[0] for k in range(groups)])
    x64 = x.astype(np.float64).reshape(groups, B, channels, H, W)
    m, v = x64.mean(axis=(1, 3, 4), keepdims=True), x64.var(axis=(1, 3, 4), keepdims=True)
    exact = ((x64 - m) / np.sqrt(v + 1e-3) * g[:, None, None] + b[:, None, None]).reshape(x.shape)
    got = FK.batch_norm(x, g, b, 1e-3, groups)
    assert np.abs(got - ref).max() < 1e-5 and np.abs(got - exact).max() < 1e-5
    assert np.abs(ref - exact).max() < 1e-5
    staged = FK.staged_bn_relu(x, *FK.bn_scale_shift(x, g, b, 1e-3, groups))
    assert np.array_equal(staged.array(), np.maximum(got, 0))
    out = np.empty((groups * B, H, W, channels), np.float32)
    for s, e in ((0, 4), (4, 5), (5, groups * B)):                # blocks across the groups' borders
        staged.fill(out[s:e], s, e)
    assert np.array_equal(out.transpose(0, 3, 1, 2), np.maximum(got, 0))
    assert np.abs(FK.batch_norm(np.ascontiguousarray(x), g, b, 1e-3, groups) - ref).max() < 1e-5   # NCHW: the reference
