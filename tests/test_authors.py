"""The options that reproduce the authors' code (RSOConfig, AUTHORS), each against a direct computation."""

import numpy as np
import pytest

from rso_np.backend import to_numpy
from rso_np.layers import BatchNorm2d
from rso_np.models import build_model, paper_mnist
from rso_np.rso import AUTHORS, RSO, RSOConfig, search_units, sigma_at_round
from rso_np.rso_fast import FastRSO


def bn_model(**kw):
    return paper_mnist(batch_norm=True, channels=2, **kw)


def data14(xp, n=60, seed=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.standard_normal((n, 1, 14, 14)).astype(np.float32) + (y / 5.0)[:, None, None, None].astype(np.float32)
    return xp.asarray(x), xp.asarray(y)


def test_order_bn_after_conv():
    """Authors: dense, then for conv 6 down to conv 1 the conv's weights, its batch norm's shift, its scale."""
    names = [u.name for u in search_units(bn_model(), RSOConfig(bn_after_conv=True))]
    want = ["fc.weight"]
    for i in range(6, 0, -1):
        want += [f"conv{i}.weight", f"bn{i}.bias", f"bn{i}.weight"]
    assert names == want
    layered = [u.name for u in search_units(bn_model(), RSOConfig())]        # the default: layer by layer
    assert layered[:4] == ["fc.weight", "bn6.weight", "bn6.bias", "conv6.weight"]
    first = [u.name for u in search_units(bn_model(), RSOConfig(bn_after_conv=True, layer_order="first-to-last"))]
    assert first[:4] == ["conv1.weight", "bn1.bias", "bn1.weight", "conv2.weight"] and first[-1] == "fc.weight"


def test_he_sigma_decay_bn_and_schedule():
    units = {u.name: u for u in search_units(bn_model(), RSOConfig(**AUTHORS))}
    assert units["conv1.weight"].sigma == pytest.approx(np.sqrt(2 / 9))          # fan_in 1 x 3 x 3
    assert units["conv4.weight"].sigma == pytest.approx(np.sqrt(2 / 18))         # 2 channels x 3 x 3
    assert units["fc.weight"].sigma == pytest.approx(np.sqrt(2 / 2))
    assert units["bn3.bias"].sigma == 0.167 and units["bn3.bias"].decay and units["bn3.weight"].decay
    assert not search_units(bn_model(), RSOConfig())[1].decay                    # default: no decay for bn
    C = 50
    assert sigma_at_round(2.0, 1, C, "authors") == pytest.approx(2.0)
    assert sigma_at_round(2.0, C, C, "authors") == pytest.approx(2.0 * (0.1 + 0.9 / C))
    assert sigma_at_round(2.0, 5, C, "authors") == pytest.approx(2.0 * (0.1 + 0.9 * 46 / 50))


def test_chunks_cycle_and_restart_for_batch_norm():
    """Consecutive chunks of one shuffle per pass, cycled; a batch-norm pass keeps the shuffle and
    starts again from the first chunk; the next conv pass draws a new shuffle."""
    x, y = data14(np, n=50)
    eng = RSO(bn_model(), x, y, RSOConfig(batch_size=8, **dict(AUTHORS, bn_reference_images=20)),
              np.random.default_rng(0))
    units = {u.name: u for u in eng.units}
    eng.start_pass(units["conv6.weight"])
    perm = eng._perm.copy()
    assert sorted(perm) == list(range(50))
    got = [eng.draw(1.0)[0] for _ in range(8)]                     # 50 // 8 = 6 chunks, then again
    for k, idx in enumerate(got):
        assert np.array_equal(idx, perm[(k % 6) * 8:(k % 6 + 1) * 8])
    eng.start_pass(units["bn6.bias"])
    assert np.array_equal(eng._perm, perm) and np.array_equal(eng.draw(1.0)[0], perm[:8])
    eng.start_pass(units["conv5.weight"])
    assert not np.array_equal(eng._perm, perm)


def test_frozen_statistics_before_the_searched_layer():
    """frozen-before: batch norms before the searched layer normalise with the statistics of the
    reference images (checked against numpy's mean and biased variance of their inputs), those from the
    searched layer on with the minibatch's; the trial loss is the network evaluated that way."""
    x, y = data14(np)
    model = bn_model(bn_eps=1e-3)
    eng = RSO(model, x, y, RSOConfig(batch_size=10, bn_statistics="frozen-before", bn_reference_images=25),
              np.random.default_rng(0))
    unit = next(u for u in eng.units if u.name == "conv4.weight")
    eng.start_pass(unit)
    d = unit.layer_index
    h = x[:25]
    for i, layer in enumerate(model.layers):
        if isinstance(layer, BatchNorm2d):
            h64 = h.astype(np.float64)
            assert np.allclose(layer.buffers["mean"], h64.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
            assert np.allclose(layer.buffers["var"], h64.var(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
            assert layer.training == (i >= d)
            g, b, eps = to_numpy(layer.params["weight"]), to_numpy(layer.params["bias"]), layer.eps
            h = ((h64 - h64.mean(axis=(0, 2, 3))[:, None, None]) / np.sqrt(h64.var(axis=(0, 2, 3))[:, None, None] + eps)
                 * g[:, None, None] + b[:, None, None]).astype(np.float32)
        else:
            h = layer.forward(h)
    # a minibatch: before d the reference statistics, from d on its own
    xb = x[30:40]
    ref = xb
    for i, layer in enumerate(model.layers):
        if isinstance(layer, BatchNorm2d):
            if i < d:
                m, v = layer.buffers["mean"], layer.buffers["var"]
            else:
                m, v = ref.mean(axis=(0, 2, 3)), ref.var(axis=(0, 2, 3))
            ref = ((ref - m[:, None, None]) / np.sqrt(v[:, None, None] + layer.eps) * layer.params["weight"][:, None, None]
                   + layer.params["bias"][:, None, None]).astype(np.float32)
        else:
            ref = layer.forward(ref)
    assert np.allclose(model.forward(xb), ref, rtol=1e-5, atol=1e-5)
    # and it is not what per-trial statistics give (the option changes the losses)
    model.train()
    assert not np.allclose(model.forward(xb), ref, rtol=1e-3, atol=1e-3)


def test_fast_engine_stores_inputs_behind_frozen_batch_norm():
    """With frozen statistics every searched conv's input is stored once per pass, also behind batch
    norm, and equals the network run up to it with the reference statistics."""
    x, y = data14(np)
    model = bn_model()
    eng = FastRSO(model, x, y, RSOConfig(batch_size=10, **dict(AUTHORS, bn_reference_images=25)),
                  np.random.default_rng(0))
    convs = [i for i, n in enumerate(model.names) if n.startswith(("conv", "fc"))]
    assert eng._points == convs[1:]
    unit = next(u for u in eng.units if u.name == "conv5.weight")
    eng.start_pass(unit)
    k, acts = eng._store_inputs(unit.layer_index)
    assert k == unit.layer_index
    assert np.allclose(acts, model.forward(x, stop=k), rtol=1e-5, atol=1e-5)
    minibatch_mode = FastRSO(bn_model(), x, y, RSOConfig(batch_size=10), np.random.default_rng(0))
    assert minibatch_mode._points == [model.names.index("bn1")]   # per-trial statistics: nothing after bn1


def test_reference_stats_leave_modes_and_match_training_mode():
    x, _ = data14(np)
    model = bn_model()
    model.eval()
    model.set_reference_stats(x[:20])
    assert all(not l.training for l in model.layers)
    out_eval = model.forward(x[:20])
    model.train()
    assert np.array_equal(out_eval, model.forward(x[:20]))       # the batch's own statistics: the same numbers


def test_center_normalisation(tmp_path, monkeypatch):
    from rso_np.data import load_dataset

    from .test_data import fake_checksums, write_set
    folder = write_set(tmp_path / "mnist")
    fake_checksums(folder, monkeypatch)
    std = load_dataset("mnist", data_dir=folder, log=None)
    cen = load_dataset("mnist", data_dir=folder, log=None, normalize="center")
    assert np.allclose(cen["x_train"], std["x_train"] * std["std"], atol=1e-5)
    assert abs(float(cen["x_train"].mean())) < 1e-5
    with pytest.raises(ValueError, match="normalize must be one of"):
        load_dataset("mnist", data_dir=folder, log=None, normalize="zscore")


@pytest.mark.parametrize("kw,match", [({"minibatches": "random"}, "minibatches must be one of"),
                                      ({"bn_statistics": "frozen"}, "bn_statistics must be one of"),
                                      ({"sigma_from": "std"}, "sigma_from must be one of"),
                                      ({"bn_reference_images": 0}, "bn_reference_images must be at least 1")])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        RSOConfig(**kw).validate()


@pytest.mark.parametrize("engine", [RSO, FastRSO])
def test_reference_batch_larger_than_the_training_set(engine):
    """frozen-before takes the statistics of the first bn_reference_images training images: more than
    the training set has is an error naming both numbers, for a network with batch norm only."""
    x, y = data14(np, n=50)
    cfg = RSOConfig(batch_size=10, bn_statistics="frozen-before", bn_reference_images=60)
    with pytest.raises(ValueError, match=r"bn_reference_images 60 is larger than the training set \(50 examples\)"):
        engine(bn_model(), x, y, cfg, np.random.default_rng(0))
    engine(paper_mnist(channels=2), x, y, cfg, np.random.default_rng(0))       # no batch norm: not used
    engine(bn_model(), x, y, RSOConfig(batch_size=10, bn_statistics="frozen-before", bn_reference_images=50),
           np.random.default_rng(0))


def test_paper_preset_with_a_network_that_lacks_its_options():
    """--preset paper with --model paper_mnist (no batch norm) or small_mnist leaves out the preset's
    batch-norm epsilon (and, for small_mnist, its global pooling), which those networks lack; given
    explicitly, they stay an error of the model's."""
    from rso_np.cli import build_parser, run_config
    cfg = lambda *a: run_config(build_parser().parse_args(["train", "--preset", "paper", *a]))
    assert (cfg("--model", "paper_mnist").bn_eps, cfg("--model", "paper_mnist").global_pool) == (None, "max")
    assert (cfg("--model", "small_mnist").bn_eps, cfg("--model", "small_mnist").global_pool) == (None, None)
    assert cfg("--model", "paper_mnist").rso == cfg().rso                      # the authors' search all the same
    assert cfg("--model", "paper_mnist", "--bn-eps", "1e-3").bn_eps == 1e-3     # given: build_model refuses it
    with pytest.raises(ValueError, match="bn_eps is for a model with batch norm"):
        build_model("paper_mnist", bn_eps=1e-3)
    with pytest.raises(ValueError, match="bn_eps must be positive, got 0"):
        build_model("paper_mnist_bn", bn_eps=0)


def test_paper_preset_is_the_authors_network():
    """``--preset paper`` builds the authors' network as their code runs it: batch norm with MXNet's
    epsilon and global max pooling before the dense layer (``nd.Pooling(global_pool=True)`` has no
    ``pool_type``, and MXNet's default is max); ``--global-pool avg`` is the ablation."""
    from rso_np.cli import build_parser, run_config
    from rso_np.models import build_model
    cfg = run_config(build_parser().parse_args(["train", "--preset", "paper"]))
    assert (cfg.model, cfg.global_pool, cfg.bn_eps, cfg.normalize) == ("paper_mnist_bn", "max", 1e-3, "center")
    layers = build_model(cfg.model, bn_eps=cfg.bn_eps, global_pool=cfg.global_pool).layers
    assert [type(l).__name__ for l in layers[-3:]] == ["BatchNorm2d", "GlobalMaxPool2d", "Dense"]
    assert run_config(build_parser().parse_args(["train", "--preset", "paper", "--global-pool", "avg"])).global_pool \
        == "avg"
    assert run_config(build_parser().parse_args(["train"])).global_pool is None     # small_mnist: no global pooling


@pytest.mark.parametrize("field,option,own,other,message", [
    ("global_pool", "--global-pool", "avg", "max", "--global-pool: the run in run has 'avg', given 'max'"),
    ("bn_eps", "--bn-eps", "1e-5", "1e-3", "--bn-eps: the run in run has 1e-05, given 0.001"),
])
def test_resume_reads_a_recorded_none_as_the_models_value(field, option, own, other, message):
    """A paper_mnist_bn run recorded without --global-pool (or before the option existed) pooled with the
    average, and one without --bn-eps ran with the model's epsilon, 1e-5: resuming it with that value is
    its own setting, with another a conflict that names both values."""
    from rso_np.cli import UsageError, build_parser, check_resume
    from rso_np.training import RunConfig
    saved = RunConfig(model="paper_mnist_bn")
    assert getattr(saved, field) is None
    parse = lambda *a: build_parser().parse_args(["train", "--resume", "--out", "run", *a])
    check_resume(parse(option, own), saved)
    with pytest.raises(UsageError, match=message):
        check_resume(parse(option, other), saved)
