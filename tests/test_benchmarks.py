"""The benchmark scripts start: each one's --help, and the prepared GPU check's dry run; what they count."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


def run(args, **env):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", **env)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_help(script):
    out = run([sys.executable, f"benchmarks/{script}", "--help"])
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and f"benchmarks/{script}" in out.stdout, out.stdout[:300]


def test_gpu_check_dry_run(tmp_path):
    out = run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], OUT=str(tmp_path))
    assert out.returncode == 0, out.stderr
    for step in ("tests:", "paper:", "conv:", "bench:", "train:", "parity:", "done:"):
        assert f"=== {step}" in out.stdout, (step, out.stdout)
    assert "skipped: no GPU" in out.stdout


def test_trial_profile_steps():
    """trial_profile --steps times the trial's steps: the kept channels' and the channel delta's methods,
    the convolutions by shape, the staged fills; each with calls per trial."""
    import json
    out = run([sys.executable, "benchmarks/trial_profile.py", "--images", "600", "--batch-size", "100",
               "--trials", "6", "--steps"])
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    steps = res["steps"]
    assert steps["_kept"]["calls_per_trial"] == 1.0 and steps["_rest_staged_bn"]["calls_per_trial"] == 1.0
    assert any(k.startswith("conv2d 300 x 16 x 7x7") for k in steps), sorted(steps)
    assert any(k.startswith("fill staged_candidates") for k in steps), sorted(steps)
    assert all(v["ms_per_trial"] >= 0 for v in steps.values())
    assert steps["_rest_staged_bn"]["ms_per_trial"] <= 1000 * res["s_per_trial"] * 1.5


def test_bench_rso_records_the_blas_kernel():
    """bench_rso.py records NumPy's BLAS and the kernel set it runs: OpenBLAS's can be forced to an older
    CPU's (OPENBLAS_CORETYPE), which slows the convolutions' products, so a figure must say which ran."""
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); import bench_rso; "
            "print(json.dumps(bench_rso.blas_info()))")
    out = run([sys.executable, "-c", code], OPENBLAS_CORETYPE="Haswell")
    assert out.returncode == 0, out.stderr
    import json
    libs = json.loads(out.stdout)
    assert libs and all({"internal_api", "version", "num_threads", "architecture"} <= set(lib) for lib in libs)
    for lib in libs:
        if lib["internal_api"] == "openblas":
            assert lib["architecture"] == "Haswell", lib


@pytest.mark.parametrize("global_pool", ["avg", "max"])
def test_bench_rso_torch_network_is_ours(global_pool):
    """The PyTorch network that bench_rso.py times is rso_np's, layer for layer: the same logits in float64
    with each minibatch's batch-norm statistics (PyTorch's own kernels are the oracle here, global max
    pooling included). Skipped where PyTorch is not installed (it is not a dependency of rso_np)."""
    torch = pytest.importorskip("torch")
    import numpy as np
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_rso
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from rso_np.models import build_model
    model = build_model("paper_mnist_bn", seed=2, bn_eps=1e-3, global_pool=global_pool)
    for p in model.parameters().values():                          # batch norm away from gamma 1, beta 0
        p += np.random.default_rng(0).normal(0, 0.1, p.shape).astype(p.dtype)
    net = bench_rso.torch_model(model).double().train()
    x = np.random.default_rng(1).standard_normal((8, 1, 28, 28))
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    for layer in model.layers:
        layer.params.update({k: v.astype(np.float64) for k, v in layer.params.items()})
    got = model.train().forward(x)
    assert np.abs(got - want).max() < 1e-9 * np.abs(want).max()


def test_trial_flops_counts(tmp_path):
    """trial_flops.py's multiply-adds against the paper network's convolutions written out by hand
    (16 channels, 3x3, padding 1; 28x28, pooled to 14x14 after conv2 and to 7x7 after conv4), and its
    ratios from a result file whose every trial takes 0.1 s in the fast engine and 2 s in PyTorch."""
    import json
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import trial_flops as tf
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from rso_np.models import build_model

    model = build_model("paper_mnist_bn", bn_eps=1e-3, global_pool="max")
    layers, ins, at = model.layers, tf.shapes(model.layers), {n: i for i, n in enumerate(model.names)}
    conv1, conv2 = 28 * 28 * 16 * 9, 28 * 28 * 16 * 144
    conv3 = conv4 = 14 * 14 * 16 * 144
    conv2_pooled = 14 * 14 * 16 * 16 * 4 * 4               # conv2 + 2x2 average pooling: 4x4, stride 2
    conv4_pooled = 7 * 7 * 16 * 16 * 4 * 4
    conv5 = conv6 = 7 * 7 * 16 * 144
    fc = 16 * 10
    B = 5000
    torch = 3 * B * (conv1 + conv2 + conv3 + conv4 + conv5 + conv6 + fc)
    assert tf.macs(layers, ins, at["conv4"], True) == conv4_pooled
    assert tf.macs(layers, ins, at["conv4"], False) == conv4
    # conv2 with kept channels: conv3 on one input channel, then conv4 (pooled), conv5, conv6 for 3B
    assert tf.trial_macs(layers, ins, at["conv2"], B, True) == \
        (3 * B * (conv3 // 16 + conv4_pooled + conv5 + conv6 + fc), torch)
    # conv1 without: conv1 and conv2 (pooled) in full for W, conv2 on one channel for the two candidates
    assert tf.trial_macs(layers, ins, at["conv1"], B, False)[0] == \
        B * (conv1 + conv2_pooled) + 2 * B * (conv2_pooled // 16) + 3 * B * (conv3 + conv4_pooled + conv5 + conv6 + fc)
    # batch norm 5's parameters: conv6 in full for W and on one channel for the candidates, then the dense layer
    assert tf.trial_macs(layers, ins, at["bn5"], B, False)[0] == B * conv6 + 2 * B * (conv6 // 16) + 3 * B * fc
    assert tf.trial_macs(layers, ins, at["fc"], B, False)[0] == 0
    avg = build_model("paper_mnist", global_pool="avg")    # no batch norm between conv6 and the pooling:
    # conv6 + global average pooling as one dense layer: the patches summed over the 7x7 pixels, then 16 x 144
    assert tf.macs(avg.layers, tf.shapes(avg.layers), avg.names.index("conv6"), True) == 49 * 144 + 16 * 144

    units = {name: {"weights": int(a.size), "s_per_trial": 0.1} for name, a in model.parameters().items()}
    bench = {"model": "paper_mnist_bn", "bn_eps": 1e-3, "global_pool": "max", "batch_size": B,
             "search": {"minibatches": "chunks"},
             "engines": {"fast": {"layers": units},
                         "torch": {"layers": {n: dict(u, s_per_trial=2.0) for n, u in units.items()}}}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    out = run([sys.executable, "benchmarks/trial_flops.py", "--bench", str(path), "--target", "40"])
    assert out.returncode == 0, out.stderr
    assert "ratio 20.0x" in out.stdout and "(2.00x faster than measured)" in out.stdout, out.stdout
    bad = run([sys.executable, "benchmarks/trial_flops.py", "--bench", str(tmp_path / "missing.json")])
    assert bad.returncode != 0 and "missing.json" in bad.stderr


def test_bench_rso_times_a_pass_first_trial_apart():
    """bench_rso.py times the first trial of a layer pass apart from the others (it makes the arrays the
    others reuse) and estimates the pass as it runs: setup, the first trial once, the rest at their pace."""
    import numpy as np
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_rso
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from rso_np.rso import RSOConfig
    from rso_np.rso_fast import FastRSO
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((256, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 256)
    cfg = RSOConfig(batch_size=32, minibatches="chunks")
    time_layer, names = bench_rso.engine_timer(FastRSO, "small_mnist", x, y, cfg, np)
    r = time_layer("conv1.weight", 4)
    assert r["trials_timed"] >= 4 and r["first_trial_s"] > 0 and r["s_per_trial"] > 0
    layers = {"a": {"weights": 10, "s_per_trial": 1.0, "first_trial_s": 5.0, "setup_s": 2.0},
              "b": {"weights": 3, "s_per_trial": 2.0, "setup_s": 0.5}}          # a GPU's: no first trial apart
    assert bench_rso.round_seconds(layers) == (2 + 5 + 9 * 1) + (0.5 + 3 * 2)


def test_bench_vs_run(tmp_path):
    """bench_vs_run.py sets each layer's estimated pass (setup, first trial, the rest at their pace) beside
    the seconds a run measured for it, and the rounds' totals."""
    bench = {"engines": {"fast": {"layers": {
        "fc.weight": {"weights": 11, "s_per_trial": 1.0, "first_trial_s": 3.0, "setup_s": 2.0},   # 2 + 3 + 10
        "conv1.weight": {"weights": 4, "s_per_trial": 5.0, "setup_s": 0.0}}}}}                   # 20
    history = {"history": [{"round": 0}, {"round": 1, "pass_seconds": {"fc.weight": 30.0, "conv1.weight": 10.0}},
                           {"round": 2, "pass_seconds": {"fc.weight": 15.0, "conv1.weight": 25.0}}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "history.json").write_text(json.dumps(history))
    r = run([sys.executable, "benchmarks/bench_vs_run.py", str(tmp_path / "bench.json"), str(tmp_path / "run")])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "round 2" in lines[0]
    assert lines[2] == "| fc.weight | 15.0 | 15.0 | 1.00 |" and lines[3] == "| conv1.weight | 20.0 | 25.0 | 0.80 |"
    assert lines[4] == "| **round** | **35** | **40** | **0.88** |"
    r = run([sys.executable, "benchmarks/bench_vs_run.py", str(tmp_path / "bench.json"), str(tmp_path / "run"),
             "--round", "1"])
    assert r.stdout.splitlines()[-1] == "| **round** | **35** | **40** | **0.88** |"
    r = run([sys.executable, "benchmarks/bench_vs_run.py", str(tmp_path / "bench.json"), str(tmp_path / "run"),
             "--round", "0"])
    assert r.returncode == 2 and "round 0: not in the run, or without pass_seconds" in r.stderr


def test_bench_sums_ways_agree_with_float64():
    """bench_sums.py times two ways to the same per-channel sums: each is batch norm's mean and mean square
    of every group, as float64 computes them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_sums
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from rso_np import fast_kernels as FK
    rng = np.random.default_rng(0)
    G, M, C, n = 3, 6 * 49, 16, 2 * 49
    v = (rng.standard_normal((G, M, C)) * 2 + 1).astype(np.float32)
    want_mean, want_sq = v.astype(np.float64).mean(axis=1), (v.astype(np.float64) ** 2).mean(axis=1)
    p = v.reshape(G * (M // n), n, C)
    for way in (FK._block_sums, bench_sums.squares_by_matmul):
        mean, sq = way(G, M, n, C, lambda i: p[i], v.dtype)
        np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sq, want_sq, rtol=1e-5)
