import json
import struct
import zipfile

import numpy as np
import pytest

from rso_np.backend import get_array_module, to_numpy
from rso_np.layers import BatchNorm2d
from rso_np.model import CheckpointError, read_npz
from rso_np.models import GLOBAL_POOLS, MODEL_OPTIONS, MODELS, build_model, model_options, paper_mnist, small_mnist


def test_paper_mnist_sizes():
    m = paper_mnist()
    assert m.num_weights() == 11824
    assert paper_mnist(batch_norm=True).num_weights() == 11824 + 192
    names = list(m.parameters())
    assert names == [f"conv{i}.weight" for i in range(1, 7)] + ["fc.weight"]
    assert [type(l).__name__ for l in m.layers].count("ReLU") == 5


def test_layout_of_paper_mnist_bn():
    m = paper_mnist(batch_norm=True)
    order = [n for n in m.names]
    assert order[:8] == ["conv1", "bn1", "relu1", "conv2", "pool2", "bn2", "relu2", "conv3"]
    assert order[-4:] == ["conv6", "bn6", "gap", "fc"]


def test_he_init_and_seeds():
    a, b = paper_mnist(seed=1), paper_mnist(seed=np.random.default_rng(1))
    for k in a.parameters():
        assert np.array_equal(a.parameters()[k], b.parameters()[k])
    w = paper_mnist(seed=0, channels=64).parameters()["conv3.weight"]
    assert w.dtype == np.float32
    assert abs(w.std() - np.sqrt(2 / (64 * 9))) < 0.02 * np.sqrt(2 / (64 * 9))


def test_forward_on_backend(xp, rng):
    m = small_mnist().to(xp)
    x = xp.asarray(rng.standard_normal((3, 1, 28, 28)).astype(np.float32))
    out = m(x)
    assert out.shape == (3, 10) and get_array_module(out) is xp and out.dtype == xp.float32
    assert m.device == ("cpu" if xp is np else "gpu")


@pytest.mark.parametrize("x,match", [
    (np.zeros((2, 28, 28), np.float32), r"x must have 4 dimensions \(N, C, H, W\), got shape \(2, 28, 28\)"),
    (np.zeros((2, 3, 28, 28), np.float32), r"x must have 1 channel\(s\) \(shape \(N, 1, H, W\)\), got shape \(2, 3, 28, 28\)"),
    (np.zeros((2, 1, 28, 28), np.uint8), r"x must be a floating-point array .* uint8"),
    (np.full((2, 1, 28, 28), np.inf, np.float32), r"x contains 1568 NaN or infinite"),
])
def test_model_input_checks(x, match):
    with pytest.raises(ValueError, match=match):
        small_mnist()(x)


def test_save_load_round_trip(tmp_path, xp, rng):
    a = paper_mnist(batch_norm=True, seed=1).to(xp)
    bn = [l for l in a.layers if isinstance(l, BatchNorm2d)][0]
    bn.buffers["mean"][...] = xp.asarray(rng.standard_normal(16).astype(np.float32))
    a.save(tmp_path / "m.npz", extra={"round": 3})
    b = paper_mnist(batch_norm=True, seed=2).to(xp)
    held = b.parameters()["conv1.weight"]
    extra = b.load(tmp_path / "m.npz")
    assert int(extra["round"]) == 3
    for k, v in a.parameters().items():
        assert np.array_equal(to_numpy(v), to_numpy(b.parameters()[k]))
    for k, v in a.buffers().items():
        assert np.array_equal(to_numpy(v), to_numpy(b.buffers()[k]))
    assert b.parameters()["conv1.weight"] is held, "load must write into the existing arrays"
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"], "no temporary file left behind"


def test_load_other_architecture(tmp_path):
    paper_mnist().save(tmp_path / "m.npz")
    with pytest.raises(CheckpointError, match="architecture mismatch"):
        small_mnist().load(tmp_path / "m.npz")
    with pytest.raises(CheckpointError, match="architecture mismatch"):
        paper_mnist(batch_norm=True).load(tmp_path / "m.npz")


def test_load_refuses_pickle(tmp_path):
    np.savez(tmp_path / "evil.npz", obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        paper_mnist().load(tmp_path / "evil.npz")


def test_load_corrupt_and_missing(tmp_path):
    p = tmp_path / "m.npz"
    paper_mnist().save(p)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        paper_mnist().load(p)
    with pytest.raises(CheckpointError, match="no such file"):
        paper_mnist().load(tmp_path / "nope.npz")


def test_checkpoint_is_compressed_and_a_damaged_one_is_named(tmp_path):
    p = tmp_path / "m.npz"
    history = json.dumps([{"round": r, "test_acc": 0.9, "passes": ["conv1.weight"] * 20} for r in range(200)])
    paper_mnist().save(p, extra={"history": history})
    text_bytes = 4 * len(history)                     # NumPy stores a str array as UTF-32
    assert p.stat().st_size < text_bytes / 4, "the history's text is stored deflated"
    assert json.loads(str(paper_mnist().load(p)["history"])) == json.loads(history)
    # a checkpoint written before compression (np.savez) still loads
    np.savez(tmp_path / "old.npz", **read_npz(p))
    assert json.loads(str(paper_mnist().load(tmp_path / "old.npz")["history"])) == json.loads(history)
    # bytes damaged inside the deflated history, the archive's directory intact: a stream that still
    # inflates (caught by the CRC), and one that inflate refuses (zlib's own error)
    good = p.read_bytes()
    with zipfile.ZipFile(p) as zf:
        at = zf.getinfo("extra/history.npy").header_offset
    name_len, extra_len = struct.unpack("<HH", good[at + 26:at + 30])
    body = at + 30 + name_len + extra_len                 # the member's deflate stream starts here
    for where, damage, cause in ((body + 200, bytes(64), "CRC"), (body, b"\xff", "invalid block type")):
        data = bytearray(good)
        data[where:where + len(damage)] = damage
        p.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=f"corrupt or truncated .npz file .*{cause}"):
            paper_mnist().load(p)


def test_population_stats_mode_switch(rng):
    m = paper_mnist(batch_norm=True)
    x = (rng.standard_normal((64, 1, 8, 8)) * 2 + 3).astype(np.float32)
    m.estimate_population_stats(x, batch_size=64)
    bn1 = m.layers[1]
    # first batch norm sees conv1's output: its population mean is that output's channel mean
    h = m.layers[0].forward(x).astype(np.float64)
    assert np.allclose(bn1.buffers["mean"], h.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert np.allclose(bn1.buffers["var"], h.var(axis=(0, 2, 3)), rtol=1e-3, atol=1e-5)
    # with population statistics equal to this batch's, eval and train mode agree on the full batch
    train_out = m.train()(x)
    eval_out = m.eval()(x)
    assert np.allclose(train_out, eval_out, rtol=1e-3, atol=1e-3)
    # but not on a single image, where batch statistics differ
    assert not np.allclose(m.train()(x[:2]), m.eval()(x[:2]), atol=1e-3)


def test_global_max_pooling_option():
    """The authors' code pools globally with max (MXNet's default pool_type): the same weights as with
    average pooling, a different layer before the dense one, and a clear error for a bad choice."""
    avg, mx = paper_mnist(batch_norm=True, seed=3), paper_mnist(batch_norm=True, seed=3, global_pool="max")
    assert [n for n in mx.names][-3:] == ["bn6", "gmp", "fc"]
    assert type(mx.layers[-2]).__name__ == "GlobalMaxPool2d"
    for k, v in avg.parameters().items():
        assert np.array_equal(v, mx.parameters()[k]), k
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    h = mx.forward(x, stop=len(mx.layers) - 2)          # bn6's output
    W = mx.parameters()["fc.weight"]
    assert np.allclose(mx.forward(x), h.max(axis=(2, 3)) @ W.T, atol=1e-5)
    assert build_model("paper_mnist_bn", global_pool="max").spec() == mx.spec()
    with pytest.raises(ValueError, match="global_pool must be one of"):
        paper_mnist(global_pool="min")
    with pytest.raises(ValueError, match="global_pool is for the paper's networks"):
        build_model("small_mnist", global_pool="max")


def test_build_model_unknown():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_options_table_says_what_each_builder_builds(name):
    # MODEL_OPTIONS is what build_model's checks and model_options read: it must name exactly the options
    # each builder takes, with the builder's own defaults, as the built network shows them.
    net = build_model(name)
    eps = {layer.eps for layer in net.batch_norms()}
    pools = {type(layer) for layer in net.layers if isinstance(layer, tuple(GLOBAL_POOLS.values()))}
    options = MODEL_OPTIONS[name]
    assert eps == ({options["bn_eps"]} if "bn_eps" in options else set())
    assert pools == ({GLOBAL_POOLS[options["global_pool"]]} if "global_pool" in options else set())
    assert model_options(name) == (options.get("bn_eps"), options.get("global_pool"))
    for key, value in (("bn_eps", 1e-3), ("global_pool", "max")):
        if key in options:
            build_model(name, **{key: value})
        else:
            with pytest.raises(ValueError, match=f"{key} is for .*not '{name}'"):
                build_model(name, **{key: value})
