"""The fast engine makes the literal engine's decisions.

Both engines run from the same seed. The fast one is kept on the literal one's path (its choice is
recorded, then the literal choice is applied), so that every trial compares the two on identical
weights: a decision that differs must be a float tie, and ties must stay below 0.1% of the trials.
The losses the fast engine computes through its shortcuts must match the literal three forward passes.
"""

import gc
import weakref

import numpy as np
import pytest

from rso_np import fast_kernels
from rso_np import rso_fast
from rso_np.backend import to_numpy
from rso_np.models import paper_mnist, small_mnist
from rso_np.rso import AUTHORS, RSO, RSOConfig
from rso_np.rso_fast import FastRSO

from .conftest import mnist_dir


def data(xp, n, size):
    folder = mnist_dir("mnist")
    if folder is None:
        rng = np.random.default_rng(0)
        y = rng.integers(0, 10, n)
        x = rng.standard_normal((n, 1, 28, 28)).astype(np.float32) + (y / 5.0)[:, None, None, None]
        x = x.astype(np.float32)
    else:
        from rso_np.data import load_dataset
        d = load_dataset("mnist", data_dir=folder, train_limit=n, test_limit=1, log=None)
        x, y = d["x_train"], d["y_train"]
    if size == 14:
        x = np.ascontiguousarray(x[:, :, ::2, ::2])
    return xp.asarray(x), xp.asarray(y)


def compare(xp, build, size, rounds=1, batch=16, n=300, monkeypatch=None, **cfg):
    x, y = data(xp, n, size)
    config = RSOConfig(batch_size=batch, **cfg)
    lit_model = build().to(xp)
    log = []
    lit = RSO(lit_model, x, y, config, np.random.default_rng(7), rounds=rounds,
              trial_hook=lambda u, j, idx, losses, k: log.append((u.name, j, losses, k)))
    lit_out = [lit.run_round(c) for c in range(1, rounds + 1)]

    fast_model = build().to(xp)
    seen = []
    real_choose = rso_fast.choose_device

    def forced(f):
        own = int(real_choose(f))
        _, _, losses, k = log[len(seen)]
        seen.append((to_numpy(f), own, losses, k))
        return xp.asarray(k)

    monkeypatch.setattr(rso_fast, "choose_device", forced)
    fast = FastRSO(fast_model, x, y, config, np.random.default_rng(7), rounds=rounds)
    fast_out = [fast.run_round(c) for c in range(1, rounds + 1)]
    assert len(seen) == len(log) == rounds * lit.num_trials()

    worst, ties = 0.0, 0
    for f, own, losses, k in seen:
        lit_f = np.array(losses)
        worst = max(worst, float(np.abs(f - lit_f).max() / np.abs(lit_f).max()))
        if own != k:
            ties += 1
            gap = abs(f[own] - f[k]) / abs(f[k])
            assert gap < 1e-6, f"decision differs by more than a float tie: {f} fast {own} literal {k}"
    assert worst < 1e-5, f"shortcut losses differ from the literal ones by {worst:.2e} (relative)"
    assert ties <= 0.001 * len(seen), f"{ties} ties in {len(seen)} trials"
    for a, b in zip(lit_out, fast_out):
        assert a["counts"].keys() == b["counts"].keys()
    for k, v in lit_model.parameters().items():
        assert np.array_equal(to_numpy(v), to_numpy(fast_model.parameters()[k])), k
    return ties, len(seen)


@pytest.mark.parametrize("build,size,cfg", [
    (lambda: small_mnist(channels=4), 28, {}),
    (lambda: paper_mnist(channels=4), 14, {}),
    (lambda: paper_mnist(batch_norm=True, channels=4), 14, {"weight_decay": 1e-4}),
    (lambda: paper_mnist(batch_norm=True, channels=4), 14, {"layer_order": "first-to-last",
                                                           "loss_agg": "mean"}),
    (lambda: paper_mnist(batch_norm=True, channels=4, bn_eps=1e-3), 14, dict(AUTHORS, bn_reference_images=100)),
    (lambda: paper_mnist(batch_norm=True, channels=4), 14, {"bn_statistics": "frozen-before",
                                                           "bn_reference_images": 100,
                                                           "layer_order": "first-to-last"}),
    (lambda: paper_mnist(channels=4), 14, {"minibatches": "chunks", "sigma_from": "he"}),
    (lambda: paper_mnist(batch_norm=True, channels=4, bn_eps=1e-3), 14,
     dict(AUTHORS, bn_statistics="minibatch", bn_reference_images=100)),
    (lambda: paper_mnist(channels=4, global_pool="max"), 14, {}),
    (lambda: paper_mnist(batch_norm=True, channels=4, bn_eps=1e-3, global_pool="max"), 14,
     dict(AUTHORS, bn_reference_images=100)),
], ids=["small", "paper", "paper_bn_wd", "paper_bn_ablation", "paper_bn_authors", "paper_bn_frozen_first_to_last",
        "paper_chunks", "paper_bn_minibatch_chunks", "paper_max", "paper_bn_authors_max"])
def test_fast_matches_literal(xp, monkeypatch, build, size, cfg):
    compare(xp, build, size, monkeypatch=monkeypatch, **cfg)


def test_kept_channels_match_literal(monkeypatch):
    """Shortcut 7 (kept channels) is what runs the conv weights of the authors' search, both on a chunk's
    first visit for an output channel (into the arrays the last channel kept, once there was one) and on
    the later visits that bring its kept channel up to date; and it makes the literal engine's decisions."""
    used = {"first": 0, "updated": 0, "reused": 0}
    first, pending = rso_fast.KeptChannels._first_visit, rso_fast.KeptChannels._pending

    def counted_first(self, rows):
        used["first"] += 1
        used["reused"] += bool(self.spare)
        return first(self, rows)

    def counted_pending(self, seen):
        out = pending(self, seen)
        used["updated"] += bool(out)
        return out

    monkeypatch.setattr(rso_fast, "KEPT_VISITS", 1)   # 300 images in chunks of 16, 36 trials per channel
    monkeypatch.setattr(rso_fast.KeptChannels, "_first_visit", counted_first)
    monkeypatch.setattr(rso_fast.KeptChannels, "_pending", counted_pending)
    _, trials = compare(np, lambda: paper_mnist(batch_norm=True, channels=4, bn_eps=1e-3), 14,
                        monkeypatch=monkeypatch, **dict(AUTHORS, bn_reference_images=100))
    assert used["first"] > 100 and used["updated"] > 100 and used["reused"] > 50, used
    assert used["first"] + used["updated"] < trials


def test_bn_global_max_matches_literal(monkeypatch):
    """Shortcut 5's batch norm then global max pooling from each channel's extremes is what the authors'
    network (global max pooling after its last batch norm) runs, its minima too (bn6's scale starts
    negative in two channels), and the trials make the literal engine's decisions."""
    calls = {"n": 0, "negative": 0}
    real = rso_fast.bn_global_max

    def counted(x, gamma, beta, eps, groups=1):
        calls["n"] += 1
        calls["negative"] += bool((gamma < 0).any())
        return real(x, gamma, beta, eps, groups)

    def build():
        model = paper_mnist(batch_norm=True, channels=4, bn_eps=1e-3, global_pool="max")
        gamma = model.parameters()["bn6.weight"]
        gamma[:2] = -gamma[:2]
        return model

    monkeypatch.setattr(rso_fast, "bn_global_max", counted)
    compare(np, build, 14, monkeypatch=monkeypatch, **dict(AUTHORS, bn_reference_images=100))
    assert calls["n"] > 500 and calls["negative"] > 500, calls


def test_per_chunk_inputs_match_literal(monkeypatch):
    """Shortcut 8 (per-chunk stored inputs) is what feeds every pass after the first batch norm with the
    minibatch's statistics and chunks, and the trials make the literal engine's decisions; with
    independent draws it is never used."""
    stored = []
    real = FastRSO._store_chunks

    def counted(self, d, k, src):
        out = real(self, d, k, src)
        stored.append((self.layers[d].__class__.__name__, out is not None))
        return out

    monkeypatch.setattr(FastRSO, "_store_chunks", counted)
    cfg = dict(AUTHORS, bn_statistics="minibatch", bn_reference_images=100, weight_decay=0.0)
    compare(np, lambda: paper_mnist(batch_norm=True, channels=4, bn_eps=1e-3), 14, monkeypatch=monkeypatch, **cfg)
    kinds = {name for name, used in stored if used}
    assert {"Dense", "Conv2d", "BatchNorm2d"} <= kinds and all(used for _, used in stored), stored
    stored.clear()
    x, y = data(np, 320, 14)
    eng = FastRSO(paper_mnist(batch_norm=True, channels=4), x, y,
                  RSOConfig(batch_size=32, **dict(cfg, minibatches="draw")), np.random.default_rng(0))
    unit = next(u for u in eng.units if u.name == "conv3.weight")
    eng.start_pass(unit)
    assert type(eng._trial_fn(unit)).__name__ == "ChannelDelta" and stored == []


def test_kept_channels_only_where_chunks_come_back(monkeypatch):
    """A conv's weights are searched with kept channels only where each chunk comes back at least
    KEPT_VISITS times within one output channel's trials, and never with independent draws."""
    x, y = data(np, 320, 14)
    cfg = dict(AUTHORS, bn_reference_images=100)

    def trial_kind(batch, **over):
        eng = FastRSO(paper_mnist(batch_norm=True, channels=4), x, y, RSOConfig(batch_size=batch, **{**cfg, **over}),
                      np.random.default_rng(0))
        unit = next(u for u in eng.units if u.name == "conv2.weight")
        eng.start_pass(unit)
        return type(eng._trial_fn(unit)).__name__

    monkeypatch.setattr(rso_fast, "KEPT_VISITS", 3)
    assert trial_kind(32) == "KeptChannels"           # 10 chunks, 36 trials per output channel: 3.6 visits
    assert trial_kind(16) == "ChannelDelta"           # 20 chunks: 1.8 visits
    assert trial_kind(32, minibatches="draw") == "ChannelDelta"


def test_batch_norm_passes_gather_their_stored_input():
    """With statistics frozen before the searched layer, a batch norm's passes gather its input (the conv's
    output) from a store made for them, computed with the weights before it; never stored ahead of time."""
    x, y = data(np, 320, 14)
    eng = FastRSO(paper_mnist(batch_norm=True, channels=4), x, y,
                  RSOConfig(batch_size=32, **dict(AUTHORS, bn_reference_images=100)), np.random.default_rng(0))
    bn = next(i for i, (n, _) in enumerate(eng.model.named_layers()) if n == "bn2")
    fc = next(u for u in eng.units if u.name == "fc.weight")
    eng.start_pass(fc)
    eng._trial_fn(fc)
    assert bn not in eng._store                       # the first pass stores the conv and dense inputs only
    unit = next(u for u in eng.units if u.name == "bn2.bias")
    eng.start_pass(unit)
    trial = eng._trial_fn(unit)
    assert trial.stored is eng._store[bn][1]
    rows = np.arange(32)
    assert np.abs(trial.get_h(rows) - eng.model.forward(x[rows], check=False, stop=bn)).max() < 1e-5


def test_channel_delta_trials_reuse_their_arrays():
    """On the CPU a channel-delta trial (a batch norm's scale or shift; a conv's weights without kept
    channels) makes no new array for its input, the candidates' channel or their changes: the second trial
    of a pass finds all of them in the workspace of the first, and its losses are the literal ones."""
    x, y = data(np, 320, 14)
    cfg = RSOConfig(batch_size=32, **dict(AUTHORS, bn_reference_images=100))
    eng = FastRSO(paper_mnist(batch_norm=True, channels=4), x, y, cfg, np.random.default_rng(0))
    lit = RSO(paper_mnist(batch_norm=True, channels=4), x, y, cfg, np.random.default_rng(0))
    units, lit_units = {u.name: u for u in eng.units}, {u.name: u for u in lit.units}
    for name in ("bn1.weight", "bn2.bias", "conv1.weight"):
        unit = units[name]
        eng.start_pass(unit)
        lit.start_pass(lit_units[name])
        trial = eng._trial_fn(unit)
        assert type(trial).__name__ == "ChannelDelta", name
        made = None
        for j in (1, 2):
            rows = eng.draw(unit.sigma)[0]
            w0 = unit.array.reshape(-1)[j]
            wp, wm = w0 + np.float32(0.05), w0 - np.float32(0.05)
            f = trial(j, rows, w0, wp, wm)
            flat = lit_units[name].array.reshape(-1)
            want = []
            for v in (wp, w0, wm):
                flat[j] = v
                want.append(lit.minibatch_loss(lit.x[rows], lit.y[rows]))
            flat[j] = w0
            assert np.allclose(f, want, rtol=1e-5), (name, f, want)
            arrays = {k: id(a) for k, a in trial.ws.arrays.items()}
            if made is None:
                made = arrays
                assert {k[0] for k in made} >= {"zc", "da"} | ({"h"} if name.startswith("bn") else set()), name
            else:
                assert arrays == made, (name, set(arrays) ^ set(made))


def test_a_pass_lets_its_arrays_go_when_it_ends():
    """When a layer pass ends, its trial object is gone, with its workspace and, for kept channels, the
    arrays kept per chunk (hundreds of MB at minibatch 5000), before the next pass makes its own; not
    passes later, whenever Python's cycle collector runs (a ChannelDelta keeps its steps as bound methods,
    a reference cycle). The collector is off during the passes, as it is between its runs."""
    x, y = data(np, 320, 14)
    eng = FastRSO(paper_mnist(batch_norm=True, channels=4), x, y,
                  RSOConfig(batch_size=32, **dict(AUTHORS, bn_reference_images=100)), np.random.default_rng(0))
    units, made, trial_fn = {u.name: u for u in eng.units}, [], eng._trial_fn

    def watched(unit):
        trial = trial_fn(unit)
        made.append((type(trial).__name__, weakref.ref(trial), weakref.ref(trial.ws)))
        return trial
    eng._trial_fn = watched
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for name in ("conv3.weight", "bn2.bias", "conv2.weight"):
            eng.start_pass(units[name])
            eng.search_unit(units[name], units[name].sigma, count=40)
            kind, trial, ws = made[-1]
            assert trial() is None and ws() is None, (name, kind)
    finally:
        if collecting:
            gc.enable()
    assert [kind for kind, _, _ in made] == ["KeptChannels", "ChannelDelta", "KeptChannels"]


def test_batch_norm_store_is_dropped_after_its_passes():
    """A batch norm's own stored input serves its two passes and no more: the next round's first pass
    drops it, so that the searched convs' inputs fit in ``cache_bytes`` as in the first round (kept, bn1's
    input stays valid until conv1's next pass and pushed conv2's input out, its trials computing conv1 on
    every minibatch)."""
    x, y = data(np, 320, 14)
    eng = FastRSO(paper_mnist(batch_norm=True, channels=4), x, y,
                  RSOConfig(batch_size=32, **dict(AUTHORS, bn_reference_images=100)), np.random.default_rng(0))
    names = [n for n, _ in eng.model.named_layers()]
    bn1, conv2 = names.index("bn1"), names.index("conv2")
    units = {u.name: u for u in eng.units}

    def store_for(name):
        eng.start_pass(units[name])
        return eng._trial_fn(units[name])
    store_for("fc.weight")
    need = eng._stored_bytes()                       # the inputs of the searched convs and the dense layer
    eng.cache_bytes = need + need // 4               # room for them, not for bn1's own input besides
    eng.model.layers[names.index("conv1")].params["weight"] *= 1.01   # as conv1's pass changes it
    trial = store_for("bn1.bias")                    # round 1's last passes: bn1's input stored for them
    assert trial.stored is eng._store[bn1][1]
    store_for("fc.weight")                           # round 2's first pass
    assert bn1 not in eng._store and conv2 in eng._store
    assert type(store_for("conv2.weight")).__name__ == "KeptChannels"
    assert store_for("conv2.weight").stored is eng._store[conv2][1]


def test_fast_matches_literal_small_blocks(monkeypatch):
    """Blocks of a few images, so that every convolution is split between threads (as at full size)."""
    monkeypatch.setattr(fast_kernels, "CONV_BLOCK_BYTES", 16 << 10)
    monkeypatch.setattr(fast_kernels, "CONV_THREADS", 3)
    compare(np, lambda: paper_mnist(channels=4), 14, monkeypatch=monkeypatch)


def test_fast_matches_literal_two_rounds_unstaged(monkeypatch):
    """The path without staged inputs (STAGED = False, as on a GPU) makes the same decisions too, and a
    second round (stored inputs recomputed into the memory of the first) still matches."""
    monkeypatch.setattr(rso_fast, "STAGED", False)
    compare(np, lambda: paper_mnist(channels=4), 14, rounds=2, monkeypatch=monkeypatch)


def test_fast_matches_literal_unforced_small():
    """Without any forcing: the same choices and the same weights over two rounds (no tie occurs here)."""
    x, y = data(np, 300, 28)
    outs, models = [], []
    for engine in (RSO, FastRSO):
        m = small_mnist(channels=4)
        r = engine(m, x, y, RSOConfig(batch_size=16), np.random.default_rng(3), rounds=2)
        outs.append([r.run_round(c)["choices"] for c in (1, 2)])
        models.append(m)
    differ = sum(int((a[k] != b[k]).sum()) for ra, rb in zip(*outs) for a, b in [(ra, rb)] for k in a)
    total = sum(v.size for r in outs[0] for v in r.values())
    assert differ <= 0.001 * total
    if differ == 0:
        for k, v in models[0].parameters().items():
            assert np.array_equal(v, models[1].parameters()[k])


def test_prefix_cache_fallback_is_exact():
    """With no room for the prefix cache the engine computes the prefix per trial: same results."""
    x, y = data(np, 300, 14)
    a, b = paper_mnist(channels=4), paper_mnist(channels=4)
    ra = FastRSO(a, x, y, RSOConfig(batch_size=16), np.random.default_rng(1))
    rb = FastRSO(b, x, y, RSOConfig(batch_size=16), np.random.default_rng(1), cache_bytes=0)
    ca, cb = ra.run_round(1)["choices"], rb.run_round(1)["choices"]
    assert sum(int((ca[k] != cb[k]).sum()) for k in ca) <= 0.001 * ra.num_trials()


@pytest.mark.slow
@pytest.mark.parametrize("bn", [False, True])
def test_fast_matches_literal_full_paper_mnist(monkeypatch, bn):
    compare(np, lambda: paper_mnist(batch_norm=bn), 14, n=200, batch=8, monkeypatch=monkeypatch,
            weight_decay=1e-4 if bn else 0.0)


def test_stored_activations_follow_the_weights():
    """A stored layer input is used only while the weights before that layer are unchanged."""
    x, y = data(np, 300, 14)
    model = paper_mnist(channels=4)
    eng = FastRSO(model, x, y, RSOConfig(batch_size=16), np.random.default_rng(1))
    d = model.names.index("conv4")
    k, acts = eng._store_inputs(d)
    assert k == d and np.allclose(acts, model.forward(x, stop=d), rtol=1e-5, atol=1e-6)
    assert eng._store_inputs(d)[1] is acts                        # reused while nothing changed
    model.layers[model.names.index("conv5")].params["weight"][0, 0, 0, 0] += 1.0
    assert eng._store_inputs(d)[1] is acts                        # a later layer does not matter
    before = acts.copy()
    model.layers[0].params["weight"][0, 0, 0, 0] += 1.0
    k, fresh = eng._store_inputs(d)                               # recomputed (into the same memory)
    assert k == d and np.allclose(fresh, model.forward(x, stop=d), rtol=1e-5, atol=1e-6)
    assert not np.allclose(fresh, before, rtol=1e-5, atol=1e-6)
