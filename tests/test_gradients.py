"""Float64 numerical gradient checks (central differences) for every backward pass."""

import numpy as np
import pytest

from rso_np import functional as F
from rso_np.backend import to_numpy
from rso_np.losses import logit_cross_entropy, logit_cross_entropy_backward
from rso_np.models import paper_mnist, small_mnist


def num_grad(f, x, eps=1e-6):
    """d f / d x by central differences; x is changed in place and restored."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def check(analytic, numeric, tol=1e-6):
    a, n = to_numpy(analytic), np.asarray(numeric)
    err = np.abs(a - n).max() / max(np.abs(n).max(), 1e-8)
    assert err < tol, f"relative gradient error {err:.2e}"


@pytest.mark.parametrize("stride,padding,bias", [(1, 0, True), (1, 1, False), (2, 1, True), (2, 2, False)])
def test_conv2d_backward(rng, stride, padding, bias):
    x = rng.standard_normal((2, 3, 7, 6))
    W = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4) if bias else None
    out = F.conv2d(x, W, b, stride, padding)
    R = rng.standard_normal(out.shape)  # loss = sum(out * R)
    loss = lambda: float((F.conv2d(x, W, b, stride, padding) * R).sum())
    dx, dW, db = F.conv2d_backward(R, x, W, b, stride, padding)
    check(dx, num_grad(loss, x))
    check(dW, num_grad(loss, W))
    if bias:
        check(db, num_grad(loss, b))
    else:
        assert db is None


@pytest.mark.parametrize("k,s", [(2, None), (3, 2), (3, 1)])
def test_pool_backward(rng, k, s):
    x = rng.standard_normal((2, 2, 7, 8))
    for fwd, bwd, arg in ((F.max_pool2d, F.max_pool2d_backward, lambda: x),
                          (F.avg_pool2d, F.avg_pool2d_backward, lambda: x.shape)):
        R = rng.standard_normal(fwd(x, k, s).shape)
        check(bwd(R, arg(), k, s), num_grad(lambda: float((fwd(x, k, s) * R).sum()), x))
    R = rng.standard_normal((2, 2))
    check(F.global_avg_pool2d_backward(R, x.shape), num_grad(lambda: float((F.global_avg_pool2d(x) * R).sum()), x))
    check(F.global_max_pool2d_backward(R, x), num_grad(lambda: float((F.global_max_pool2d(x) * R).sum()), x))


def test_relu_linear_flatten_backward(rng):
    x = rng.standard_normal((3, 2, 2, 3))
    R = rng.standard_normal(x.shape)
    check(F.relu_backward(R, x), num_grad(lambda: float((F.relu(x) * R).sum()), x))
    R = rng.standard_normal((3, 12))
    check(F.flatten_backward(R, x.shape), num_grad(lambda: float((F.flatten(x) * R).sum()), x))
    h = rng.standard_normal((4, 5))
    W = rng.standard_normal((3, 5))
    b = rng.standard_normal(3)
    R = rng.standard_normal((4, 3))
    loss = lambda: float((F.linear(h, W, b) * R).sum())
    dh, dW, db = F.linear_backward(R, h, W, b)
    check(dh, num_grad(loss, h))
    check(dW, num_grad(loss, W))
    check(db, num_grad(loss, b))


@pytest.mark.parametrize("batch_stats", [True, False])
def test_batch_norm_backward(rng, batch_stats):
    x = rng.standard_normal((3, 2, 4, 3)) * 2 + 0.5
    g, b = rng.standard_normal(2), rng.standard_normal(2)
    m, v = (None, None) if batch_stats else (rng.standard_normal(2), rng.random(2) + 0.5)
    R = rng.standard_normal(x.shape)
    loss = lambda: float((F.batch_norm2d(x, g, b, m, v)[0] * R).sum())
    _, cache = F.batch_norm2d(x, g, b, m, v)
    dx, dg, db = F.batch_norm2d_backward(R, cache, g, batch_stats)
    check(dx, num_grad(loss, x), 1e-5)
    check(dg, num_grad(loss, g))
    check(db, num_grad(loss, b))


@pytest.mark.parametrize("agg", ["mean", "sum"])
def test_cross_entropy_backward(rng, agg):
    z = rng.standard_normal((5, 4)) * 3
    y = rng.integers(0, 4, 5)
    check(logit_cross_entropy_backward(z, y, agg), num_grad(lambda: float(logit_cross_entropy(z, y, agg)), z))


def as_float64(model):
    for layer in model.layers:
        for d in (layer.params, layer.buffers):
            for k in d:
                d[k] = d[k].astype(np.float64)
    return model


@pytest.mark.parametrize("build,size", [(lambda: paper_mnist(seed=3), 12),
                                        (lambda: paper_mnist(batch_norm=True, seed=3), 12),
                                        (lambda: small_mnist(seed=3), 28)], ids=["paper", "paper_bn", "small"])
def test_whole_model_gradient(rng, build, size):
    """Backward through the whole network against central differences on a tiny batch.

    Every parameter array is checked on a random subset of its entries (all of them
    for small arrays) to keep the test fast.
    """
    model = as_float64(build())
    x = rng.standard_normal((2, 1, size, size))
    y = np.array([3, 7])
    loss = lambda: float(logit_cross_entropy(model.forward(x), y, "sum"))
    model.backward(logit_cross_entropy_backward(model.forward(x), y, "sum"))
    grads = model.gradients()
    for name, p in model.parameters().items():
        idx = rng.choice(p.size, size=min(p.size, 12), replace=False)
        flat = p.reshape(-1)
        for i in idx:
            old = flat[i]
            flat[i] = old + 1e-6
            fp = loss()
            flat[i] = old - 1e-6
            fm = loss()
            flat[i] = old
            num = (fp - fm) / 2e-6
            ana = grads[name].reshape(-1)[i]
            assert abs(num - ana) <= 1e-5 * max(1.0, abs(num)), f"{name}[{i}]: analytic {ana} vs numeric {num}"
