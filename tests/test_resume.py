"""A run stopped anywhere (Ctrl-C included) resumes from its last finished layer pass and ends exactly as
the run that was never stopped; a resumed run keeps its recorded settings."""

import json

import numpy as np
import pytest

from rso_np.cli import main
from rso_np.model import read_npz
from rso_np.rso import AUTHORS, RSOConfig
from rso_np.training import RunConfig, Trainer

from .conftest import mnist_dir

MNIST = mnist_dir("mnist")
needs_mnist = pytest.mark.skipif(MNIST is None, reason="real MNIST files not found ($RSO_NP_DATA or ../shared/data)")


def small_bn(monkeypatch):
    """paper_mnist_bn with 4 channels (892 weights) in place of the full one, for speed."""
    from rso_np import training
    from rso_np.models import paper_mnist
    monkeypatch.setattr(training, "build_model",
                        lambda name, seed=0, bn_eps=None, global_pool=None:
                        paper_mnist(True, seed, channels=4, bn_eps=bn_eps, global_pool=global_pool or "avg"))


def authors_run(tmp_path, name, stop_at=None, resume=False, hook=None):
    """The authors' configuration on 200 images; ``stop_at``: Ctrl-C at that trial of the round; ``hook``: a
    progress hook instead."""
    from rso_np.data import load_dataset
    data = load_dataset("mnist", data_dir=MNIST, train_limit=200, test_limit=100, log=None, normalize="center")
    cfg = RunConfig(model="paper_mnist_bn", rounds=1, bn_eps=1e-3, normalize="center", eval_bn_stats="reference",
                    eval_each_pass=True, eval_train_limit=100,
                    rso=RSOConfig(batch_size=40, **dict(AUTHORS, bn_reference_images=50)).to_dict())

    def progress(done, total, what):
        if done == stop_at:
            raise KeyboardInterrupt
    return Trainer(cfg, tmp_path / name, data=data, resume=resume, log=lambda s: None,
                   progress=progress if stop_at else hook)


@needs_mnist
def test_stopped_in_a_batch_norm_pass_resumes_bit_identical(tmp_path, monkeypatch):
    """Stopped inside bn6.bias's pass, which goes on with the shuffle of conv6's pass before it."""
    small_bn(monkeypatch)
    authors_run(tmp_path, "full").run()
    stop_at = 40 + 144 + 3                                 # fc (40), conv6 (144), then bn6.bias
    with pytest.raises(KeyboardInterrupt):
        authors_run(tmp_path, "part", stop_at=stop_at).run()
    ck = read_npz(tmp_path / "part" / "checkpoint.npz")
    pos = json.loads(str(ck["extra/position"]))
    assert pos["round"] == 1 and pos["passes_done"] == 2 and set(pos["counts"]) == {"fc.weight", "conv6.weight"}
    assert len(pos["passes"]) == 2 and pos["perm_state"] is not None
    assert set(pos["pass_seconds"]) == {"fc.weight", "conv6.weight"}
    resumed = authors_run(tmp_path, "part", resume=True)
    assert resumed.position["passes_done"] == 2
    resumed.run()
    a, b = read_npz(tmp_path / "full" / "checkpoint.npz"), read_npz(tmp_path / "part" / "checkpoint.npz")
    params = [k for k in a if k.startswith("param/")]
    assert len(params) == 6 + 12 + 1
    for k in params:
        assert np.array_equal(a[k], b[k]), k
    assert str(a["extra/rng_state"]) == str(b["extra/rng_state"])
    ha, hb = json.loads(str(a["extra/history"])), json.loads(str(b["extra/history"]))
    assert [r["test_loss"] for r in ha] == [r["test_loss"] for r in hb]
    assert ha[1]["counts"] == hb[1]["counts"] and [p["test_acc"] for p in ha[1]["passes"]] == \
        [p["test_acc"] for p in hb[1]["passes"]]
    assert set(hb[1]["pass_seconds"]) == set(hb[1]["counts"]), "the stopped passes' seconds come back"
    assert hb[1]["pass_seconds"]["fc.weight"] == pos["pass_seconds"]["fc.weight"]
    assert json.loads(str(b["extra/position"])) is None


@needs_mnist
def test_resumed_run_estimates_the_round_from_the_last_one(tmp_path, monkeypatch):
    """A resumed run's progress starts with the pace of the last round recorded (each pass's seconds over
    its trials): the time left in the round shows from the first trial, not only after a round here."""
    import io

    from rso_np.progress import Progress
    small_bn(monkeypatch)
    authors_run(tmp_path, "run").run()
    rec = json.loads((tmp_path / "run" / "history.json").read_text())["history"][1]
    bar = Progress(stream=io.StringIO(), log_every=0)
    authors_run(tmp_path, "run", resume=True, hook=bar)
    assert list(bar.pace) == list(rec["counts"]), "every layer, in search order"
    for w, (n, per) in bar.pace.items():
        assert n == sum(rec["counts"][w]) and per == pytest.approx(rec["pass_seconds"][w] / n)
    bar(1, sum(n for n, _ in bar.pace.values()), "fc.weight")
    assert "left in the round" in bar.stream.getvalue()


@needs_mnist
@pytest.mark.parametrize("given,needle", [
    (["--model", "paper_mnist"], "--model: the run in"),
    (["--batch-size", "64"], "--batch-size: the run in"),
    (["--rounds", "5"], "--rounds: the run in"),
    (["--preset", "paper"], "--model: the run in"),
    (["--minibatches", "chunks"], "--minibatches: the run in"),
    (["--global-pool", "max"], "--global-pool: the run in"),
])
def test_resume_refuses_other_settings(tmp_path, capsys, given, needle):
    out = tmp_path / "run"
    base = ["train", "--data-dir", str(MNIST), "--train-limit", "300", "--test-limit", "50", "--eval-train-limit", "50",
            "--no-progress", "--out", str(out)]
    assert main([*base, "--batch-size", "256", "--rounds", "2", "--stop-after", "1"]) == 0
    capsys.readouterr()
    code = main([*base, "--resume", *given])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    run_value = {"--model": "'small_mnist'", "--batch-size": "256", "--rounds": "2", "--preset": "'small_mnist'",
                 "--minibatches": "'draw'", "--global-pool": "None"}[given[0]]
    assert f"has {run_value}, given" in err, err
    assert main([*base, "--resume", "--batch-size", "256", "--rounds", "2"]) == 0   # the same settings: fine
