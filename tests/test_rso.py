"""Invariants of the literal RSO search on a tiny seeded problem."""

import numpy as np
import pytest

from rso_np.backend import to_numpy
from rso_np.layers import AvgPool2d, BatchNorm2d, Conv2d, Dense, Flatten, ReLU
from rso_np.losses import logit_cross_entropy
from rso_np.model import Sequential
from rso_np.rso import KEEP, MINUS, PLUS, RSO, RSOConfig, candidates, choose, sigma_at_round


def tiny_model(seed=0, bn=False):
    rng = np.random.default_rng(seed)
    layers = [("conv1", Conv2d(1, 2, 3, padding=1, rng=rng))]
    if bn:
        layers.append(("bn1", BatchNorm2d(2)))
    layers += [("relu1", ReLU()), ("pool1", AvgPool2d(2)), ("conv2", Conv2d(2, 2, 3, padding=1, rng=rng)),
               ("relu2", ReLU()), ("flat", Flatten()), ("fc", Dense(2 * 4 * 4, 3, rng=rng))]
    return Sequential(layers)


def tiny_data(xp, n=40, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32) + y[:, None, None, None].astype(np.float32)
    return xp.asarray(x), xp.asarray(y)


def snapshot(model):
    return {k: to_numpy(v).copy() for k, v in model.parameters().items()}


@pytest.mark.parametrize("order", ["last-to-first", "first-to-last"])
def test_every_weight_once_in_layer_order(xp, order):
    model = tiny_model().to(xp)
    x, y = tiny_data(xp)
    seen = []
    rso = RSO(model, x, y, RSOConfig(batch_size=8, layer_order=order), np.random.default_rng(0),
              trial_hook=lambda u, j, idx, losses, k: seen.append((u.name, j)))
    rso.run_round(1)
    names = ["fc.weight", "conv2.weight", "conv1.weight"]
    if order == "first-to-last":
        names = names[::-1]
    sizes = {k: v.size for k, v in model.parameters().items()}
    assert seen == [(n, j) for n in names for j in range(sizes[n])]


def test_batch_norm_searched_with_fixed_sigma(xp):
    model = tiny_model(bn=True).to(xp)
    x, y = tiny_data(xp)
    rso = RSO(model, x, y, RSOConfig(batch_size=8), np.random.default_rng(0))
    assert [u.name for u in rso.units] == ["fc.weight", "conv2.weight", "bn1.weight", "bn1.bias", "conv1.weight"]
    assert rso.sigmas["bn1.weight"] == rso.sigmas["bn1.bias"] == 0.167
    off = RSO(model, x, y, RSOConfig(batch_size=8, search_batch_norm=False), np.random.default_rng(0))
    assert "bn1.weight" not in off.sigmas


def test_accept_lowers_loss_and_reject_is_bit_identical(xp):
    model = tiny_model().to(xp)
    x, y = tiny_data(xp)
    before = [snapshot(model)]
    counts = {PLUS: 0, KEEP: 0, MINUS: 0}

    def hook(unit, j, idx, losses, k):
        counts[k] += 1
        now = snapshot(model)
        xi = xp.asarray(idx)
        loss_now = float(logit_cross_entropy(model(x[xi]).astype(xp.float64), y[xi], "sum"))
        if k == KEEP:
            for name in now:
                assert np.array_equal(now[name].view(np.uint32), before[0][name].view(np.uint32)), name
        else:
            # accepted: the loss on this trial's minibatch, recomputed, is not above the loss before
            assert loss_now <= losses[KEEP]
            changed = {n for n in now if not np.array_equal(now[n], before[0][n])}
            assert changed == {unit.name}
            assert np.count_nonzero(now[unit.name] != before[0][unit.name]) == 1
        before[0] = now

    RSO(model, x, y, RSOConfig(batch_size=8, weight_decay=0.0), np.random.default_rng(3),
        trial_hook=hook).run_round(1)
    assert counts[KEEP] > 0 and counts[PLUS] + counts[MINUS] > 0, counts


def test_sigma_matches_initial_weights_and_schedule(xp):
    model = tiny_model(seed=5).to(xp)
    init = snapshot(model)
    x, y = tiny_data(xp)
    rso = RSO(model, x, y, RSOConfig(batch_size=8), np.random.default_rng(0), rounds=3)
    for name, w in init.items():
        assert rso.sigmas[name] == pytest.approx(w.astype(np.float64).std(), rel=1e-12)
    s = rso.sigmas["conv2.weight"]
    assert sigma_at_round(s, 1, 3, "linear") == s
    assert sigma_at_round(s, 3, 3, "linear") == pytest.approx(s / 10)
    assert sigma_at_round(s, 2, 3, "linear") == pytest.approx(s * 0.55)
    assert sigma_at_round(s, 3, 3, "constant") == s
    # the deltas of round 3 are drawn with sigma_d / 10
    rso.run_round(1)
    rso.run_round(2)
    draws = []
    orig = rso.draw
    rso.draw = lambda sigma: (draws.append(sigma), orig(sigma))[1]
    rso.run_round(3)
    assert np.allclose(sorted(set(draws)), sorted(u.sigma / 10 for u in rso.units))


def test_same_seed_same_history(xp):
    def run():
        model = tiny_model().to(xp)
        x, y = tiny_data(xp)
        rso = RSO(model, x, y, RSOConfig(batch_size=8), np.random.default_rng(11), rounds=2)
        out = [rso.run_round(c)["choices"] for c in (1, 2)]
        return out, snapshot(model)

    (c1, w1), (c2, w2) = run(), run()
    for a, b in zip(c1, c2):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)


def test_weight_decay_shrinks_kept_weights(xp):
    model = tiny_model().to(xp)
    x, y = tiny_data(xp)
    before = snapshot(model)
    res = RSO(model, x, y, RSOConfig(batch_size=8, weight_decay=0.5), np.random.default_rng(0)).run_round(1)
    after = snapshot(model)
    keep = res["choices"]["fc.weight"] == KEEP
    assert keep.any()
    np.testing.assert_array_equal(after["fc.weight"].ravel()[keep],
                                  (before["fc.weight"].ravel()[keep].astype(np.float64) * 0.5).astype(np.float32))


def test_choose_ties_keep():
    assert choose(1.0, 1.0, 1.0) == KEEP
    assert choose(0.5, 1.0, 0.5) == PLUS
    assert choose(2.0, 1.0, 0.5) == MINUS
    assert choose(0.5, 0.5, 0.1) == MINUS


@pytest.mark.parametrize("kw,match", [
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"sigma_schedule": "cosine"}, "sigma_schedule must be one of"),
    ({"layer_order": "random"}, "layer_order must be one of"),
    ({"weight_decay": 1.5}, r"weight_decay must lie in \[0, 1\)"),
])
def test_bad_config(kw, match):
    x, y = tiny_data(np)
    with pytest.raises(ValueError, match=match):
        RSO(tiny_model(), x, y, RSOConfig(**kw))


def test_batch_larger_than_data():
    x, y = tiny_data(np, n=10)
    with pytest.raises(ValueError, match="batch_size 16 is larger than the training set"):
        RSO(tiny_model(), x, y, RSOConfig(batch_size=16))


class _DeviceScalar:
    """A 0-d device array as CuPy's behaves: float() copies it to the host, NumPy may not convert it."""

    def __init__(self, v):
        self.v = np.float32(v)

    def __float__(self):
        return float(self.v)

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed")


@pytest.mark.parametrize("wd", [0.0, 1e-4])
def test_candidates_of_a_device_scalar(wd):
    """The literal engine hands ``candidates`` a 0-d array of the model's backend; on CuPy that must not go
    through NumPy's implicit conversion, and the values are the host's, bit for bit."""
    w, dw = np.float32(0.3712), 0.0123456789
    host = candidates(w, dw, wd)
    dev = candidates(_DeviceScalar(w), dw, wd)
    assert all(type(v) is np.float32 for v in dev)
    assert [v.tobytes() for v in dev] == [v.tobytes() for v in host]
    w0 = np.float32(np.float64(w) * (1 - wd))
    assert dev[0] == np.float32(np.float64(w0) + dw) and dev[2] == np.float32(np.float64(w0) - dw)
