"""Kernels against independent oracles: plain loops, scipy.signal.correlate, scipy.special.logsumexp."""

import numpy as np
import pytest
from scipy.signal import correlate

from rso_np import functional as F
from rso_np.backend import get_array_module, to_numpy


def rel_err(a, b):
    a, b = to_numpy(a).astype(np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def conv_scipy(x, W, b, stride, padding):
    """Independent oracle: scipy.signal.correlate per (image, out channel), then subsample."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    N = x.shape[0]
    outs = []
    for n in range(N):
        outs.append([correlate(x[n], W[o].astype(np.float64), mode="valid")[0] for o in range(W.shape[0])])
    out = np.array(outs)[:, :, ::stride, ::stride]
    if b is not None:
        out += b[None, :, None, None]
    return out


CONV_CASES = [  # N, C_in, H, W, C_out, K, stride, padding
    (1, 1, 5, 5, 1, 3, 1, 0),
    (2, 3, 7, 9, 4, 3, 1, 1),
    (3, 2, 8, 5, 5, 3, 2, 1),
    (1, 4, 9, 11, 3, 5, 2, 2),
    (2, 3, 6, 7, 2, 2, 1, 0),
    (1, 2, 10, 6, 3, 3, 2, 0),
    (2, 5, 13, 13, 6, 4, 3, 2),
]


def conv_arrays(case, bias, rng):
    """(x, W, b or None, stride, padding) of a CONV_CASES case, float32 on the host."""
    N, C, H, W_, O, K, s, p = case
    x = rng.standard_normal((N, C, H, W_)).astype(np.float32)
    W = rng.standard_normal((O, C, K, K)).astype(np.float32)
    return x, W, (rng.standard_normal(O).astype(np.float32) if bias else None), s, p


def on(xp, x, W, b, s, p):
    return xp.asarray(x), xp.asarray(W), None if b is None else xp.asarray(b), s, p


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_conv2d_vs_naive_and_scipy(xp, case, bias, rng):
    x, W, b, s, p = conv_arrays(case, bias, rng)
    out = F.conv2d(*on(xp, x, W, b, s, p))
    assert get_array_module(out) is xp and out.dtype == xp.float32
    ref = conv_scipy(x, W, b, s, p)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5, "conv2d (im2col) vs scipy.signal.correlate"
    naive = F.conv2d_naive(x, W, b, s, p)
    assert rel_err(naive, ref) < 1e-5, "conv2d_naive vs scipy.signal.correlate"
    assert rel_err(out, naive) < 1e-5


def pool_loops(x, k, s, op):
    N, C, H, W = x.shape
    OH, OW = (H - k) // s + 1, (W - k) // s + 1
    out = np.empty((N, C, OH, OW))
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    out[n, c, i, j] = op(x[n, c, i * s:i * s + k, j * s:j * s + k])
    return out


@pytest.mark.parametrize("shape,k,s", [((1, 1, 4, 4), 2, None), ((2, 3, 7, 9), 2, None),
                                       ((2, 2, 9, 8), 3, 2), ((1, 3, 5, 6), 3, 1), ((3, 1, 6, 6), 3, None)])
def test_pooling_vs_loops(xp, shape, k, s, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    stride = k if s is None else s
    mx = F.max_pool2d(xp.asarray(x), k, s)
    av = F.avg_pool2d(xp.asarray(x), k, s)
    assert get_array_module(mx) is xp and mx.dtype == xp.float32 and av.dtype == xp.float32
    assert rel_err(mx, pool_loops(x, k, stride, np.max)) < 1e-6
    assert rel_err(av, pool_loops(x, k, stride, np.mean)) < 1e-5
    g = F.global_avg_pool2d(xp.asarray(x))
    assert g.shape == shape[:2]
    assert rel_err(g, x.astype(np.float64).mean(axis=(2, 3))) < 1e-5
    gm = F.global_max_pool2d(xp.asarray(x))
    loops = np.array([[max(x[n, c].ravel()) for c in range(shape[1])] for n in range(shape[0])])
    assert gm.shape == shape[:2] and gm.dtype == xp.float32 and rel_err(gm, loops) == 0


def test_relu_flatten_linear(xp, rng):
    x = rng.standard_normal((5, 2, 3, 4)).astype(np.float32)
    r = F.relu(xp.asarray(x))
    assert rel_err(r, np.where(x > 0, x, 0)) == 0
    f = F.flatten(xp.asarray(x))
    assert f.shape == (5, 24) and rel_err(f, x.reshape(5, 24)) == 0
    W = rng.standard_normal((7, 24)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    y = F.linear(f, xp.asarray(W), xp.asarray(b))
    ref = np.array([[sum(float(x.reshape(5, 24)[n, k]) * float(W[o, k]) for k in range(24)) + b[o]
                     for o in range(7)] for n in range(5)])
    assert rel_err(y, ref) < 1e-5


def test_batch_norm_vs_formula(xp, rng):
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32) * 3 + 1
    g = rng.standard_normal(3).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    out, _ = F.batch_norm2d(xp.asarray(x), xp.asarray(g), xp.asarray(b))
    x64 = x.astype(np.float64)
    for c in range(3):
        v = x64[:, c]
        ref = (v - v.mean()) / np.sqrt(v.var() + 1e-5) * g[c] + b[c]
        assert rel_err(out[:, c], ref) < 1e-5
    m = np.array([0.5, -1, 2], np.float32)
    v = np.array([1, 4, 0.25], np.float32)
    out2, _ = F.batch_norm2d(xp.asarray(x), xp.asarray(g), xp.asarray(b), xp.asarray(m), xp.asarray(v))
    ref2 = (x64 - m[:, None, None]) / np.sqrt(v[:, None, None] + 1e-5) * g[:, None, None] + b[:, None, None]
    assert rel_err(out2, ref2) < 1e-5


BAD_CONV_INPUTS = [   # an input for W (4, 3, 3, 3), and the error it must raise
    (np.zeros((2, 3, 4), np.float32), r"x must have 4 dimensions \(N, C, H, W\), got shape \(2, 3, 4\)"),
    (np.zeros((2, 2, 5, 5), np.float32), r"x has 2 channels but W expects C_in=3"),
    (np.zeros((2, 3, 5, 5), np.int64), r"x must be a floating-point array .* got dtype int64"),
]


@pytest.mark.parametrize("bad,match", BAD_CONV_INPUTS)
def test_conv2d_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        F.conv2d(bad, np.zeros((4, 3, 3, 3), np.float32))


def test_kernel_too_large():
    with pytest.raises(ValueError, match="does not fit input 2x2"):
        F.conv2d(np.zeros((1, 1, 2, 2), np.float32), np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="does not fit input 1x1"):
        F.max_pool2d(np.zeros((1, 1, 1, 1), np.float32), 2)


def test_linear_bad_features():
    with pytest.raises(ValueError, match="x has 5 features but W expects in_features=4"):
        F.linear(np.zeros((2, 5), np.float32), np.zeros((3, 4), np.float32))
