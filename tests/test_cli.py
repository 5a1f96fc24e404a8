"""The command line end to end on a small real MNIST subset, resume, and every kind of bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rso_np.cli import main
from rso_np.model import read_npz

from .conftest import mnist_dir
from .test_data import fake_checksums, write_set

MNIST = mnist_dir("mnist")
needs_mnist = pytest.mark.skipif(MNIST is None, reason="real MNIST files not found ($RSO_NP_DATA or ../shared/data)")
RUN_FILES = ["checkpoint.npz", "history.csv", "history.json", "history.md", "loss.png"]
SMALL = ["--train-limit", "200", "--test-limit", "100", "--eval-train-limit", "100", "--no-progress"]


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@needs_mnist
def test_train_rso_end_to_end(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, "-m", "rso_np", "train", "--data-dir", str(MNIST), "--rounds", "2",
                        "--batch-size", "16", "--out", str(out), *SMALL], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(l.split("|")[0].strip() == "2" for l in lines if "|" in l), r.stdout
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    meta = json.loads((out / "history.json").read_text())
    h = meta["history"]
    assert [r["round"] for r in h] == [0, 1, 2]
    assert h[2]["train_loss"] < h[0]["train_loss"], "two rounds of RSO lower the training loss"
    assert sum(h[1]["counts"]["fc.weight"]) == 3920, "every fc weight tried once"
    assert set(h[1]["pass_seconds"]) == set(h[1]["counts"]), "the seconds of every layer pass"
    assert 0 < sum(h[1]["pass_seconds"].values()) <= h[1]["seconds"]
    assert 10 ** 7 < h[0]["peak_rss_bytes"] <= h[2]["peak_rss_bytes"] < 24 * 2 ** 30, "the peak memory so far"
    assert (out / "history.csv").read_text().splitlines()[0].startswith("round,train_loss,train_acc")
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "history.md").read_text().splitlines()
    assert table[0] == "| round | train loss | train acc | test loss | test acc | best so far | accepted | seconds |"
    assert [l.split("|")[1].strip() for l in table[2:]] == ["0", "1", "2"]
    assert table[3].split("|")[5].strip() == f"{100 * h[1]['test_acc']:.2f}%"


@needs_mnist
@pytest.mark.parametrize("optimizer,flag", [("rso", "--rounds"), ("sgd", "--epochs")])
def test_resume_matches_uninterrupted(tmp_path, capsys, optimizer, flag):
    base = ["train", "--optimizer", optimizer, "--data-dir", str(MNIST), "--batch-size", "16", "--seed", "3",
            flag, "2", *SMALL]
    assert run_cli([*base, "--out", str(tmp_path / "full")], capsys)[0] == 0
    part = tmp_path / "stopped"
    assert run_cli([*base, "--out", str(part), "--stop-after", "1"], capsys)[0] == 0
    h = json.loads((part / "history.json").read_text())["history"]
    assert [r["round"] for r in h] == [0, 1]
    code, out, err = run_cli(["train", "--resume", "--out", str(part), "--data-dir", str(MNIST), "--no-progress"],
                             capsys)
    assert code == 0, err
    assert "resumed after 1 of 2" in out
    before = {p.name: p.read_bytes() for p in part.iterdir()}
    code, out, err = run_cli(["train", "--resume", "--out", str(part), "--data-dir", str(MNIST), "--no-progress"],
                             capsys)
    assert code == 0, err
    assert f"has all its 2 {flag[2:]}: nothing to do" in out, "a finished run says so"
    assert {p.name: p.read_bytes() for p in part.iterdir()} == before, "and is left as it is"
    a, b = read_npz(tmp_path / "full" / "checkpoint.npz"), read_npz(part / "checkpoint.npz")
    params = [k for k in a if k.startswith("param/")]
    assert params
    for k in params:
        assert np.array_equal(a[k], b[k]), k
    assert str(a["extra/rng_state"]) == str(b["extra/rng_state"])
    ha = json.loads((tmp_path / "full" / "history.json").read_text())["history"]
    hb = json.loads((part / "history.json").read_text())["history"]
    assert [r["test_loss"] for r in ha] == [r["test_loss"] for r in hb]


@needs_mnist
def test_sgd_and_plot_overlay(tmp_path, capsys):
    base = ["train", "--data-dir", str(MNIST), "--batch-size", "16", *SMALL]
    assert run_cli([*base, "--optimizer", "sgd", "--epochs", "1", "--out", str(tmp_path / "sgd")], capsys)[0] == 0
    assert run_cli([*base, "--rounds", "1", "--out", str(tmp_path / "rso")], capsys)[0] == 0
    for x in ("rounds", "updates"):
        code, out, err = run_cli(["plot", str(tmp_path / "rso"), str(tmp_path / "sgd"), "--x", x,
                                  "--out", str(tmp_path / f"cmp-{x}.png")], capsys)
        assert code == 0, err
        assert (tmp_path / f"cmp-{x}.png").read_bytes()[:4] == b"\x89PNG"
    sgd = json.loads((tmp_path / "sgd" / "history.json").read_text())["history"]
    assert sgd[1]["weight_updates"] == 200 // 16 + 1
    code, _, err = run_cli(["plot", str(tmp_path / "rso"), str(tmp_path / "sgd"), "--label", "only one",
                            "--out", str(tmp_path / "x.png")], capsys)
    assert_one_line_error(code, err, "--label: given 1 times for 2 runs")
    code, out, err = run_cli(["table", str(tmp_path / "sgd")], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == "| epoch | train loss | train acc | test loss | test acc | best so far | seconds |"
    assert out == (tmp_path / "sgd" / "history.md").read_text()
    code, out, err = run_cli(["table", str(tmp_path / "rso"), str(tmp_path / "sgd")], capsys)
    assert code == 0, err
    head = out.splitlines()[0].split(" | ")
    assert head[0] == "| round" and head[-1] == "mean |" and len(head) == 4 and "optimizer rso" in head[1]


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("args,needles", [
    (["--optimizer", "adam"], ["--optimizer", "invalid choice: 'adam'"]),
    (["--dataset", "cifar"], ["--dataset", "invalid choice"]),
    (["--rounds", "0"], ["--rounds", "must be at least 1, got 0"]),
    (["--rounds", "-3"], ["--rounds", "must be at least 1, got -3"]),
    (["--epochs", "x"], ["--epochs", "whole number"]),
    (["--model", "vgg"], ["--model", "invalid choice: 'vgg'"]),
    (["--sigma-schedule", "cosine"], ["--sigma-schedule", "invalid choice"]),
    (["--resume"], ["--resume needs --out"]),
    (["--model", "paper_mnist_bn", "--bn-eps", "0"], ["--bn-eps", "must be positive, got 0"]),
])
def test_bad_options(args, needles, capsys, tmp_path):
    code, out, err = run_cli(["train", "--data-dir", str(tmp_path), *args], capsys)
    assert_one_line_error(code, err, *needles)


def test_unknown_command(capsys):
    assert_one_line_error(*run_cli(["fly"], capsys)[::2], "invalid choice: 'fly'")


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    folder = write_set(tmp_path / "mnist", n_train=60, n_test=20)
    fake_checksums(folder, monkeypatch)
    return folder


def run_bad(capsys, tmp_path, data_dir, *extra):
    out = tmp_path / "out"
    code, _, err = run_cli(["train", "--data-dir", str(data_dir), "--rounds", "1", "--batch-size", "8",
                            "--out", str(out), "--no-progress", *extra], capsys)
    return code, err, out


def test_batch_larger_than_training_set(capsys, tmp_path, fake_mnist):
    code, err, out = run_bad(capsys, tmp_path, fake_mnist, "--batch-size", "100")
    assert_one_line_error(code, err, "batch_size 100 is larger than the training set (60 examples)")
    assert not out.exists()


@pytest.mark.parametrize("batch,note", [
    ("8", "note: --minibatches chunks with --batch-size 8: 7 chunks per layer pass; the last 4 images of "
          "each pass's shuffle sit that pass out (a batch size that divides 60 uses them all)"),
    ("10", None),
])
def test_chunks_that_leave_images_out_say_so(capsys, tmp_path, fake_mnist, batch, note):
    """Chunked minibatches with a batch size that does not divide the training set: the run says, before
    it starts, how many images of each pass's shuffle sit the pass out; with one that divides, nothing."""
    code, out, err = run_cli(["train", "--data-dir", str(fake_mnist), "--stop-after", "1", "--batch-size", batch,
                              "--minibatches", "chunks", "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert notes == ([note] if note else []), out


@pytest.mark.parametrize("extra,needle", [
    ((), "with eval_bn_stats 'reference' the evaluation"),
    (("--eval-bn-stats", "population"), "with bn_statistics 'frozen-before' the batch norms"),
])
def test_reference_batch_larger_than_training_set(capsys, tmp_path, fake_mnist, extra, needle):
    """--preset paper on a training set smaller than its reference batch (2000 images): one line naming
    both numbers and what the reference batch is for, before the run folder is made."""
    code, err, out = run_bad(capsys, tmp_path, fake_mnist, "--preset", "paper", "--batch-size", "8", *extra)
    assert_one_line_error(code, err, "bn_reference_images 2000 is larger than the training set (60 examples)",
                          needle)
    assert not out.exists()


def test_gpu_unavailable(capsys, tmp_path, fake_mnist, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    code, err, out = run_bad(capsys, tmp_path, fake_mnist, "--device", "gpu")
    assert_one_line_error(code, err, "device 'gpu' needs CuPy", "pip install cupy-cuda")
    assert not out.exists()


@pytest.mark.parametrize("damage,needle", [
    (lambda f: (f / "train-labels-idx1-ubyte.gz").unlink(), "train-labels-idx1-ubyte.gz: no such file"),
    (lambda f: (f / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage!"), "t10k-images-idx3-ubyte.gz: checksum mismatch"),
    (lambda f: (f / "train-images-idx3-ubyte.gz").write_bytes(
        (f / "train-images-idx3-ubyte.gz").read_bytes()[:100]), "train-images-idx3-ubyte.gz: checksum mismatch"),
])
def test_bad_data_files(capsys, tmp_path, fake_mnist, damage, needle):
    damage(fake_mnist)
    code, err, out = run_bad(capsys, tmp_path, fake_mnist)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_corrupt_and_truncated_data_with_matching_checksums(capsys, tmp_path, monkeypatch):
    import gzip
    folder = write_set(tmp_path / "mnist", n_train=60, n_test=20)
    raw = gzip.decompress((folder / "train-images-idx3-ubyte.gz").read_bytes())
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-50]))       # truncated IDX
    fake_checksums(folder, monkeypatch)
    code, err, out = run_bad(capsys, tmp_path, folder)
    assert_one_line_error(code, err, "train-images-idx3-ubyte.gz", "truncated or wrong count")
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00corrupt")          # corrupt gzip
    fake_checksums(folder, monkeypatch)
    code, err, out = run_bad(capsys, tmp_path, folder)
    assert_one_line_error(code, err, "ubyte.gz")
    assert not out.exists()


def test_unwritable_out(capsys, tmp_path, fake_mnist):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_cli(["train", "--data-dir", str(fake_mnist), "--rounds", "1", "--batch-size", "8",
                            "--out", str(blocker / "run"), "--no-progress"], capsys)
    assert_one_line_error(code, err, "--out", "cannot write there")
    # an existing folder where the run's lock file cannot be made (here a folder has its name: the check
    # holds for root too, whom permissions do not stop)
    from rso_np.training import LOCK
    (tmp_path / "run" / LOCK).mkdir(parents=True)
    code, _, err = run_cli(["train", "--data-dir", str(fake_mnist), "--rounds", "1", "--batch-size", "8",
                            "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert_one_line_error(code, err, "--out", "cannot write there")


def test_checkpoint_other_model_or_corrupt(capsys, tmp_path, fake_mnist):
    out = tmp_path / "run"
    base = ["train", "--data-dir", str(fake_mnist), "--batch-size", "8", "--no-progress", "--out", str(out)]
    assert run_cli([*base, "--optimizer", "sgd", "--epochs", "1"], capsys)[0] == 0
    # a run folder with a checkpoint is not overwritten by a new run
    code, _, err = run_cli([*base, "--optimizer", "sgd", "--epochs", "1"], capsys)
    assert_one_line_error(code, err, "exists: use --resume")
    # the checkpoint replaced by one of another architecture
    from rso_np.models import paper_mnist
    ck = read_npz(out / "checkpoint.npz")
    before = (out / "history.json").read_text()
    extra = {k[len("extra/"):]: v for k, v in ck.items() if k.startswith("extra/")}
    paper_mnist().save(out / "checkpoint.npz", extra=extra)
    code, _, err = run_cli([*base, "--resume"], capsys)
    assert_one_line_error(code, err, "cannot resume", "architecture mismatch")
    # a truncated checkpoint
    p = out / "checkpoint.npz"
    p.write_bytes(p.read_bytes()[:300])
    code, _, err = run_cli([*base, "--resume"], capsys)
    assert_one_line_error(code, err, "checkpoint.npz", "corrupt or truncated")
    assert (out / "history.json").read_text() == before, "failed runs leave the folder as it was"
    assert sorted(x.name for x in out.iterdir()) == RUN_FILES


def test_a_run_folder_in_use_is_refused(capsys, tmp_path, fake_mnist):
    """A second train in a folder where a run is training (a --resume of a run still going in the
    background, say) stops before it loads data or writes anything; the folder is free again when the
    first ends."""
    from rso_np._io import folder_lock
    from rso_np.training import LOCK
    out = tmp_path / "run"
    base = ["train", "--data-dir", str(fake_mnist), "--batch-size", "8", "--no-progress", "--out", str(out)]
    assert run_cli([*base, "--optimizer", "sgd", "--epochs", "2", "--stop-after", "1"], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with folder_lock(out, LOCK):              # held through another open file, as by another process
        code, out_text, err = run_cli([*base, "--resume"], capsys)
        assert_one_line_error(code, err, f"run folder {out}", f"(pid {os.getpid()}) is training in it",
                              "--resume")
        assert out_text == "", "refused before the run's header (data loaded, model built) is printed"
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK} == before
    code, out_text, err = run_cli([*base, "--resume"], capsys)
    assert code == 0, err
    assert "resumed after 1 of 2" in out_text
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES, "the lock file goes when the run ends"


@needs_mnist
def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, capsys):
    """``kill PID`` (SIGTERM; a job started in the background from a script ignores Ctrl-C's SIGINT) stops
    a run with the message of Ctrl-C and exit status 143, the lock released and no half-written file; the
    run resumes from its checkpoint."""
    import signal
    import time
    out = tmp_path / "run"
    env = dict(os.environ, MPLBACKEND="Agg")
    p = subprocess.Popen([sys.executable, "-m", "rso_np", "train", "--data-dir", str(MNIST), "--rounds", "30",
                          "--batch-size", "16", "--out", str(out), *SMALL],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.npz").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)                                        # into round 1's layer passes
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, (p.returncode, stderr)
    assert "stopped by SIGTERM" in stderr and "continue with --resume" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert sorted(q.name for q in out.iterdir()) == RUN_FILES, "no lock file or temporary file is left"
    handler = signal.getsignal(signal.SIGTERM)
    code, text, err = run_cli(["train", "--data-dir", str(MNIST), "--rounds", "30", "--batch-size", "16",
                               "--out", str(out), "--resume", "--stop-after", "1", *SMALL], capsys)
    assert code == 0, err
    assert "resumed after" in text, text
    assert signal.getsignal(signal.SIGTERM) is handler, "main() puts the SIGTERM handler before it back"


@needs_mnist
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_python_swallows_still_stops_the_run(tmp_path, capsys, monkeypatch, signum):
    """A signal that lands while Python runs a finaliser or a weakref callback raises its exception there, and
    Python swallows it (it only prints "Exception ignored in ..."): the run must still stop, at its next trial,
    with the message and exit status of a plain stop, not go on to the end and exit 0."""
    import signal
    from rso_np import cli, training
    sig = getattr(signal, signum)

    raised = []

    class SignalledInFinaliser:
        def __del__(self):
            try:
                signal.raise_signal(sig)               # the handler's exception is raised here ...
            except BaseException as exc:
                raised.append(type(exc))
                raise                                  # ... and Python swallows it

    evaluate, calls = training.evaluate, []

    def evaluate_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:                            # round 0's evaluation is done (train and test sets)
            SignalledInFinaliser()
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", evaluate_then_signal)
    hook = sys.unraisablehook
    out = tmp_path / "run"
    code, text, err = run_cli(["train", "--data-dir", str(MNIST), "--rounds", "3", "--batch-size", "16",
                               "--out", str(out), *SMALL], capsys)
    assert raised == [cli.Terminated if signum == "SIGTERM" else KeyboardInterrupt], raised
    assert code == 128 + sig, (code, err)
    word = "stopped by SIGTERM" if signum == "SIGTERM" else "interrupted"
    assert word in err and "continue with --resume" in err, err
    assert "Exception ignored" not in err and "Traceback" not in err, "a swallowed stop prints no traceback"
    assert sys.unraisablehook is hook, "main() puts sys.unraisablehook back"
    assert cli._stop_signal is None, "the stop is forgotten once main() has acted on it"
    rounds = [r["round"] for r in json.loads((out / "history.json").read_text())["history"]]
    assert rounds == [0], f"the run stops in round 1, at its first trial after the signal: {rounds}"
    assert sorted(q.name for q in out.iterdir()) == RUN_FILES, "no lock file or temporary file is left"


def test_the_checked_progress_hook_passes_on_what_the_hook_has():
    """The check in front of the progress hook calls it, offers its ``remember`` only where it has one (the
    trainer asks with ``hasattr``), and can be copied."""
    import copy
    from rso_np import cli
    seen = []

    class Hook:
        def __call__(self, *args):
            seen.append(args)

        def remember(self, paces):
            seen.append(paces)

    checked = cli._Checked(Hook())
    checked(1, 2, "fc.weight")
    checked.remember(["pace"])
    assert seen == [(1, 2, "fc.weight"), ["pace"]]
    assert not hasattr(cli._Checked(None), "remember")
    cli._Checked(None)(1, 2, "fc.weight")
    assert hasattr(copy.copy(checked), "remember") and not hasattr(copy.copy(cli._Checked(None)), "remember")


def test_plot_labels(tmp_path, monkeypatch):
    """Runs of the same optimiser and model get their folder's name in the legend; --label names them."""
    from rso_np import cli
    seen = []
    monkeypatch.setattr("rso_np.plotting.plot_runs",
                        lambda runs, out, x, title: seen.append([r["label"] for r in runs]))
    rec = {"round": 0, "train_loss": 1.0, "train_acc": 0.1, "test_loss": 1.0, "test_acc": 0.1, "accepted": None,
           "seconds": 0.0, "weight_updates": 0}
    for name, model in (("seed0", "small_mnist"), ("seed1", "small_mnist"), ("other", "paper_mnist")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "history.json").write_text(json.dumps({"optimizer": "rso", "model": model,
                                                                  "history": [rec]}))
    runs = [str(tmp_path / n) for n in ("seed0", "seed1", "other")]
    assert cli.main(["plot", *runs, "--out", str(tmp_path / "a.png")]) == 0
    labels = ["--label", "a", "--label", "b", "--label", "c"]
    assert cli.main(["plot", *runs, "--out", str(tmp_path / "b.png"), *labels]) == 0
    assert seen == [["RSO small_mnist (seed0)", "RSO small_mnist (seed1)", "RSO paper_mnist"], ["a", "b", "c"]]


def test_plot_bad_run_folder(capsys, tmp_path):
    code, _, err = run_cli(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")], capsys)
    assert_one_line_error(code, err, "history.json: no such file")
    code, _, err = run_cli(["table", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "history.json: no such file")


def test_progress_bar_draws_and_clears():
    """On a terminal: a tqdm bar with the count, the layer searched, trials per second and the time left,
    redrawn in place and cleared after the round's last trial."""
    import io
    from rso_np.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    buf = Terminal()
    bar = Progress(stream=buf)
    bar(1, 4, "fc.weight")
    bar(4, 4, "conv1.weight")       # the last one closes the bar (and clears the line)
    assert bar.bar is None
    text = buf.getvalue()
    assert "fc.weight" in text and "0/4" in text and "trial/s" in text and "\r" in text
    assert text.rstrip(" ").endswith("\r")
    bar(1, 3, "conv6.weight")       # the next round opens a new bar
    assert bar.bar is not None and bar.bar.total == 3


def test_progress_lines_in_a_log(monkeypatch):
    """Written to a file (a background run), progress is a plain line now and then, never a bar."""
    import io

    import tqdm.std
    from rso_np.progress import Progress
    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    buf = io.StringIO()
    bar = Progress(stream=buf, log_every=60)
    for t, done in ((1.0, 1), (10.0, 2), (61.0, 3), (62.0, 4)):
        now[0] = t
        bar(done, 10, "conv2.weight")
    now[0] = 200.0
    bar(10, 10, "conv1.weight")
    lines = buf.getvalue().splitlines()          # after 61 s, and at the end (138 s after the last line)
    assert lines == ["  3/10 trials (30%), conv2.weight, 20.00s/trial, 03:30 left at this pace",
                     "  10/10 trials (100%), conv1.weight, 19.89s/trial, 00:00 left at this pace"], buf.getvalue()


def test_progress_setup_before_a_layer_is_not_its_pace(monkeypatch):
    """The time before a layer's first trial (the evaluation after the last pass, the new layer's store
    pass) is not that layer's pace: its first trial is counted but not timed, and the next round's
    estimate adds the setup once."""
    import io

    import tqdm.std
    from rso_np.progress import Progress
    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    buf = io.StringIO()
    bar = Progress(stream=buf, log_every=0)
    steps = [(0, 1, "fc"), (1, 2, "fc"), (601, 3, "bn"), (602, 4, "bn"), (603, 5, "bn")]   # 600 s of setup
    for t, done, what in steps:
        now[0] = t
        bar(done, 10, what)
    first = [line.split(", ")[-1] for line in buf.getvalue().splitlines()]
    assert first[-3:] == ["? left", "00:06 left at this pace", "00:05 left at this pace"], first
    bar.close()
    assert bar.pace == {"fc": (2, 1.0), "bn": (3, 1.0)}
    assert bar.setup == {"fc": 0.0, "bn": 599.0}
    buf.truncate(0)
    buf.seek(0)
    now[0] = 1000
    bar(1, 10, "fc")                                       # next round: fc's 1 s, then bn's setup and 3 s
    assert buf.getvalue().splitlines()[-1].split(", ")[-1] == "10:03 left in the round", buf.getvalue()


def test_progress_remembers_a_recorded_round(monkeypatch):
    """``remember``: the pace of a round recorded before (a resumed run) gives the time left from the
    first trial; a round seen in this process replaces it, and a second ``remember`` changes nothing."""
    import io

    import tqdm.std
    from rso_np.progress import Progress
    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    buf = io.StringIO()
    bar = Progress(stream=buf, log_every=0)
    bar.remember([("fc", 4, 4.0), ("conv", 2, 20.0)])
    bar(1, 6, "fc")
    assert buf.getvalue().splitlines()[-1].endswith("00:23 left in the round"), buf.getvalue()   # 3 x 1 s + 20 s
    for t, done, what in [(1, 2, "fc"), (2, 3, "fc"), (3, 4, "fc"), (5, 5, "conv"), (7, 6, "conv")]:
        now[0] = t
        bar(done, 6, what)
    assert bar.pace == {"fc": (4, 1.0), "conv": (2, 2.0)}, "the round seen here"
    bar.remember([("fc", 4, 400.0)])
    assert bar.pace == {"fc": (4, 1.0), "conv": (2, 2.0)}


def test_progress_time_left_by_layer(monkeypatch):
    """In a round after one seen whole, the time left is each layer's pace in that round times its trials
    still to come (a slow layer ahead counts as slow); in the first round, the current layer's pace."""
    import io

    import tqdm.std
    from rso_np.progress import Progress
    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    buf = io.StringIO()
    bar = Progress(stream=buf, log_every=0)                # a line at every trial
    steps = [(0, 1, "fc"), (1, 2, "fc"), (2, 3, "fc"), (3, 4, "fc"), (13, 5, "conv"), (23, 6, "conv")]
    for t, done, what in steps:                            # 4 trials of 1 s, then 2 of 10 s
        now[0] = t
        bar(done, 6, what)
    first = [line.split(", ")[-1] for line in buf.getvalue().splitlines()]
    assert first[-6:] == ["? left", "00:04 left at this pace", "00:03 left at this pace", "00:02 left at this pace",
                         "? left", "00:00 left at this pace"], first
    assert bar.pace == {"fc": (4, 1.0), "conv": (2, 10.0)}
    assert bar.setup == {"fc": 0.0, "conv": 0.0}
    buf.truncate(0)
    buf.seek(0)
    for t, done, what in steps[:3]:                        # round 2: the slow layer is still to come
        now[0] = 100 + t
        bar(done, 6, what)
    second = [line.split(", ")[-1] for line in buf.getvalue().splitlines()]
    assert second[-3:] == ["00:23 left in the round", "00:22 left in the round", "00:21 left in the round"], second
