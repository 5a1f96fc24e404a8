"""Sweeps on a real Dask cluster (two worker processes): points equal runs alone, re-runs do no work, a
lost worker and a failing point do not stop the others, bad SPEC files end before anything runs."""

import json
import os
import signal
import threading
import time

import pytest

from rso_np.cli import main
from rso_np.model import read_npz

from .conftest import mnist_dir

distributed = pytest.importorskip("dask.distributed")
MNIST = mnist_dir("mnist")
needs_mnist = pytest.mark.skipif(MNIST is None, reason="real MNIST files not found ($RSO_NP_DATA or ../shared/data)")

BASE = {"model": "small_mnist", "train_limit": 600, "test_limit": 200, "eval_train_limit": 200, "rounds": 1,
        "batch_size": 64, "no_progress": None}


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


def write_spec(tmp_path, axes, base=None, name="spec.toml"):
    base = {k: v for k, v in {**BASE, "data_dir": str(MNIST), **(base or {})}.items() if v is not None}
    lines = [f'out = "{tmp_path / "sweep"}"', "[base]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in base.items()]
    lines += ["[axes]"] + [f"{k} = {json.dumps(v)}" for k, v in axes.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep(spec, cluster):
    code = main(["sweep", str(spec), "--scheduler", cluster.scheduler_address])
    return code


def train_alone(tmp_path, options, name):
    argv = ["train", "--no-progress", "--out", str(tmp_path / name), "--data-dir", str(MNIST)]
    for k, v in {**BASE, **options}.items():
        if v is not None and k != "no_progress":
            argv += ["--" + k.replace("_", "-"), str(v)]
    assert main(argv) == 0
    return json.loads((tmp_path / name / "history.json").read_text())["history"]


@needs_mnist
def test_points_equal_runs_alone_and_reruns_do_no_work(tmp_path, cluster, capsys):
    spec = write_spec(tmp_path, {"layer_order": ["last-to-first", "first-to-last"], "seed": [0, 1]})
    assert sweep(spec, cluster) == 0
    out = tmp_path / "sweep"
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["layer_order-first-to-last_seed-0", "layer_order-first-to-last_seed-1",
                       "layer_order-last-to-first_seed-0", "layer_order-last-to-first_seed-1"]
    for order in ("last-to-first", "first-to-last"):
        for seed in (0, 1):
            alone = train_alone(tmp_path, {"layer_order": order, "seed": seed}, f"alone-{order}-{seed}")
            point = json.loads((out / f"layer_order-{order}_seed-{seed}" / "history.json").read_text())["history"]
            assert [r["test_loss"] for r in point] == [r["test_loss"] for r in alone]
    assert (out / "sweep.csv").read_text().count("\n") == 5 and (out / "sweep.png").exists()
    assert "| layer_order | seed | final_test_acc |" in (out / "sweep.md").read_text()
    # again: nothing to do
    stamps = {f: (out / f / "checkpoint.npz").stat().st_mtime_ns for f in folders}
    capsys.readouterr()
    assert sweep(spec, cluster) == 0
    assert "4 already done" in capsys.readouterr().out
    assert {f: (out / f / "checkpoint.npz").stat().st_mtime_ns for f in folders} == stamps
    # one point's folder gone: only that point runs again
    import shutil
    shutil.rmtree(out / folders[0])
    assert sweep(spec, cluster) == 0
    assert "3 already done" in capsys.readouterr().out
    assert {f: (out / f / "checkpoint.npz").stat().st_mtime_ns for f in folders[1:]} == \
        {f: stamps[f] for f in folders[1:]}
    assert (out / folders[0] / "checkpoint.npz").exists()


@needs_mnist
def test_a_killed_worker_does_not_lose_a_point(tmp_path, cluster):
    """A worker process killed while it runs a point: Dask starts the point again and it finishes, from
    its checkpoint, with every file whole."""
    spec = write_spec(tmp_path, {"seed": [0, 1]}, base={"rounds": 3, "batch_size": 128})
    client = distributed.Client(cluster.scheduler_address)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", sweep(spec, cluster)))
    thread.start()
    out = tmp_path / "sweep"
    deadline = time.time() + 120
    while time.time() < deadline and not any((p / "checkpoint.npz").exists() for p in out.glob("seed-*")):
        time.sleep(0.2)
    pids = client.run(os.getpid)                            # worker address -> its process
    busy = [a for a, keys in client.processing().items() if keys]
    os.kill(pids[busy[0]] if busy else next(iter(pids.values())), signal.SIGKILL)
    thread.join(timeout=300)
    client.close()
    assert result.get("code") == 0
    for seed in (0, 1):
        ck = read_npz(out / f"seed-{seed}" / "checkpoint.npz")
        h = json.loads(str(ck["extra/history"]))
        assert [r["round"] for r in h] == [0, 1, 2, 3]
    alone = train_alone(tmp_path, {"seed": 1, "rounds": 3, "batch_size": 128}, "alone")
    point = json.loads((out / "seed-1" / "history.json").read_text())["history"]
    assert [r["test_loss"] for r in point] == [r["test_loss"] for r in alone]


@needs_mnist
def test_a_failing_point_is_reported_and_the_others_finish(tmp_path, cluster, capsys):
    spec = write_spec(tmp_path, {"batch_size": [64, 5000]})             # 5000 > the 600 training images
    assert sweep(spec, cluster) == 1
    captured = capsys.readouterr()
    assert "point batch_size-5000 failed" in captured.out and "larger than the training set" in captured.out
    assert "1 point(s) failed: batch_size-5000" in captured.err
    assert (tmp_path / "sweep" / "batch_size-64" / "history.json").exists()


@pytest.mark.parametrize("content,needle", [
    ('[base]\nbatch_sise = 64\n[axes]\nseed = [0]\n', "unknown option 'batch_sise'"),
    ('[base]\nmodel = "small_mnist"\n[axes]\nseed = []\n', "axis 'seed' must be a non-empty list"),
    ('[base]\nbatch_size = "big"\n', "--batch-size: must be a whole number"),
    ('[base]\nlayer_order = "sideways"\n', "--layer-order: invalid choice"),
    ('[base\nmodel = 1\n', "not valid TOML"),
    ('[bases]\nmodel = "small_mnist"\n', "unknown top-level key(s) ['bases']"),
])
def test_bad_spec_one_line_exit_2(tmp_path, capsys, content, needle):
    spec = tmp_path / "bad.toml"
    spec.write_text(content)
    code = main(["sweep", str(spec)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "bad").exists(), "nothing ran"


def test_unreadable_spec(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: cannot read it" in capsys.readouterr().err


@needs_mnist
def test_stop_after_in_a_spec_is_rounds_in_all(tmp_path, cluster):
    """stop_after = 1 with rounds = 3: one round of the 3-round schedule, then the point is finished."""
    spec = write_spec(tmp_path, {"seed": [0]}, base={"rounds": 3, "stop_after": 1})
    assert sweep(spec, cluster) == 0
    h = json.loads((tmp_path / "sweep" / "seed-0" / "history.json").read_text())
    assert [r["round"] for r in h["history"]] == [0, 1] and h["settings"]["rounds"] == 3
    stamp = (tmp_path / "sweep" / "seed-0" / "checkpoint.npz").stat().st_mtime_ns
    assert sweep(spec, cluster) == 0
    assert (tmp_path / "sweep" / "seed-0" / "checkpoint.npz").stat().st_mtime_ns == stamp
