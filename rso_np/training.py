"""Running a training job: rounds (RSO) or epochs (SGD), evaluation, history, plots, checkpoints, resume.

Files written into the run folder, each atomically (temporary file, then rename), after every round (and
for RSO after every layer pass, with the position in the round, so that a stopped run loses at most the
layer pass it was in):
``history.json`` and ``history.csv`` (one record per round, round 0 being the initial network),
``history.md`` (the same as a Markdown table, ``history_markdown``; ``python -m rso_np table DIR`` prints it),
``loss.png`` (loss per round, with an accuracy panel) and ``checkpoint.npz`` (weights, optimiser state,
the random generator's state, the history and the run's settings). A run resumed from its checkpoint
ends with the same weights as one that was never stopped. While it trains, the process holds the folder
(``.rso_np.lock`` in it, removed at the end): a second run there stops before it loads data or writes
anything.
"""

import csv
import io
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._io import FolderBusy, atomic_write_text, folder_lock
from .backend import get_xp, synchronize, to_device
from .data import load_dataset
from .fast_kernels import parallel_cpu
from .losses import accuracy, logit_cross_entropy
from .model import CheckpointError, read_npz
from .models import build_model, model_options
from .plotting import plot_runs
from .rso import KEEP, MINUS, PLUS, RSO, RSOConfig
from .rso_fast import FastRSO
from .sgd import SGD, SGDConfig

CHECKPOINT = "checkpoint.npz"
LOCK = ".rso_np.lock"      # held by the process training in the folder (Trainer.run), removed when it ends
ENGINES = {"literal": RSO, "fast": FastRSO}
CSV_FIELDS = ("round", "train_loss", "train_acc", "test_loss", "test_acc", "best_test_acc", "accepted", "seconds",
              "weight_updates")
EVAL_BN_STATS = ("population", "reference")


@dataclass
class RunConfig:
    """Everything that defines a run (saved in its checkpoint)."""

    optimizer: str = "rso"
    engine: str = "fast"            # RSO engine: "fast" (rso_fast.FastRSO) or "literal" (rso.RSO)
    model: str = "small_mnist"
    dataset: str = "mnist"
    rounds: int = 10                # RSO rounds or SGD epochs
    seed: int = 0
    train_limit: int = None
    test_limit: int = None
    eval_train_limit: int = 10000   # training examples used for the per-round train loss/accuracy
    normalize: str = "standardize"  # input normalisation (data.load_dataset); authors: "center"
    bn_eps: float = None            # batch norm's epsilon (None: the model's default); authors: 1e-3
    eval_bn_stats: str = "population"   # batch-norm statistics when evaluating; authors: "reference"
    eval_each_pass: bool = False    # evaluate the test set after every layer pass too (authors)
    global_pool: str = None         # the paper's networks: "avg" (None: the model's default) or "max" (authors)
    rso: dict = field(default_factory=lambda: RSOConfig().to_dict())
    sgd: dict = field(default_factory=lambda: SGDConfig().to_dict())

    def to_json(self):
        return json.dumps(self.__dict__, sort_keys=True)


def saved_run_config(out_dir):
    """The RunConfig recorded in the checkpoint of the run folder ``out_dir``."""
    ckpt = read_npz(Path(out_dir) / CHECKPOINT)
    try:
        return RunConfig(**json.loads(str(ckpt["extra/run_config"])))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{Path(out_dir) / CHECKPOINT}: no readable run settings ({exc})") from None


def check_writable(out_dir):
    """Create ``out_dir`` if needed and prove a file can be written there; OSError naming it if not."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".probe-", dir=out)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise cannot_write(out, exc) from None


def cannot_write(out_dir, exc):
    """The OSError that says ``--out`` cannot be written, and why (``exc``)."""
    return OSError(f"--out {out_dir}: cannot write there ({exc.strerror or exc})")


def evaluate(model, x, y, batch_size=1000):
    """(mean loss, accuracy) of ``model`` in evaluation mode on (x, y), in chunks."""
    model.eval()
    total, correct = 0.0, 0.0
    with parallel_cpu():                                  # conv2d on every CPU core
        for s in range(0, x.shape[0], batch_size):
            logits = model.forward(x[s:s + batch_size], check=False).astype(model.xp.float64)
            yb = y[s:s + batch_size]
            total += float(logit_cross_entropy(logits, yb, "sum", check=False))
            correct += accuracy(logits, yb) * yb.shape[0]
    model.train()
    return total / x.shape[0], correct / x.shape[0]


def rng_state_json(rng):
    return json.dumps(rng.bit_generator.state)


def rng_from_json(text):
    state = json.loads(text)
    rng = np.random.Generator(getattr(np.random, state["bit_generator"])())
    rng.bit_generator.state = state
    return rng


class Trainer:
    """One training run, on "cpu" or "gpu", writing into ``out_dir``.

    ``log(str)`` prints table rows; ``progress(done, total, what)`` is the hook inside a round.
    """

    def __init__(self, config, out_dir, device="cpu", data_dir=None, resume=False, log=print,
                 progress=None, data=None):
        self.out = Path(out_dir)
        self.log = log
        self.progress = progress
        if self.out.is_dir():
            with self._hold():              # a run training there now: say so before loading anything
                pass
        ckpt = read_npz(self.out / CHECKPOINT) if resume else None
        if resume:
            saved = RunConfig(**json.loads(str(ckpt["extra/run_config"])))
            saved.rounds = config.rounds if config.rounds is not None else saved.rounds
            config = saved
        elif (self.out / CHECKPOINT).exists():
            raise CheckpointError(f"{self.out / CHECKPOINT} exists: use --resume to continue that run, "
                                  "or choose another --out")
        self.config = config
        if config.rounds is None or config.rounds < 1:
            raise ValueError(f"rounds/epochs must be at least 1, got {config.rounds}")
        if config.eval_bn_stats not in EVAL_BN_STATS:
            raise ValueError(f"eval_bn_stats must be one of {EVAL_BN_STATS}, got {config.eval_bn_stats!r}")
        self.xp = get_xp(device)
        self.device = device
        d = data if data is not None else load_dataset(config.dataset, data_dir, config.train_limit,
                                                       config.test_limit, normalize=config.normalize)
        self.x_train, self.y_train = to_device(d["x_train"], self.xp), to_device(d["y_train"], self.xp)
        self.x_test, self.y_test = to_device(d["x_test"], self.xp), to_device(d["y_test"], self.xp)
        n_eval = min(config.eval_train_limit or self.x_train.shape[0], self.x_train.shape[0])
        self.x_eval, self.y_eval = self.x_train[:n_eval], self.y_train[:n_eval]
        self.model = build_model(config.model, seed=config.seed, bn_eps=config.bn_eps,
                                 global_pool=config.global_pool).to(self.xp)
        self.n_reference = n_ref = RSOConfig(**config.rso).bn_reference_images
        if config.eval_bn_stats == "reference" and self.model.batch_norms() and n_ref > self.x_train.shape[0]:
            raise ValueError(f"bn_reference_images {n_ref} is larger than the training set "
                             f"({self.x_train.shape[0]} examples): with eval_bn_stats 'reference' the evaluation "
                             "uses batch norm's statistics of that many first images")
        self.rng = np.random.default_rng(config.seed + 1)   # the model's initialisation used `seed`
        self.history = []
        self.position = None    # within a round: {"round", "passes_done", "counts", "passes", "seconds",
        #                         "pass_seconds", "perm_state"}
        sigmas = None
        if ckpt is not None:
            try:
                self.model.load(self.out / CHECKPOINT, data=ckpt)
            except CheckpointError as exc:
                raise CheckpointError(f"cannot resume: {exc}") from None
            self.rng = rng_from_json(str(ckpt["extra/rng_state"]))
            self.history = json.loads(str(ckpt["extra/history"]))
            sigmas = json.loads(str(ckpt["extra/sigmas"]))
            self.position = json.loads(str(ckpt["extra/position"])) if "extra/position" in ckpt else None
            seen = [r for r in self.history if r.get("pass_seconds")]
            if seen and config.optimizer == "rso" and hasattr(progress, "remember"):
                last = seen[-1]                         # the time left in a round, from the last one recorded
                progress.remember([(w, sum(last["counts"].get(w, ())), t) for w, t in last["pass_seconds"].items()])
        if config.optimizer == "rso":
            if config.engine not in ENGINES:
                raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {config.engine!r}")
            self.opt = ENGINES[config.engine](self.model, self.x_train, self.y_train, RSOConfig(**config.rso),
                                              self.rng, rounds=config.rounds, sigmas=sigmas, progress=progress)
        elif config.optimizer == "sgd":
            self.opt = SGD(self.model, self.x_train, self.y_train, SGDConfig(**config.sgd), self.rng,
                           epochs=config.rounds, progress=progress)
            if ckpt is not None:
                for k in self.opt.velocity:
                    self.opt.velocity[k][...] = self.xp.asarray(ckpt[f"extra/velocity/{k}"])
        else:
            raise ValueError(f"optimizer must be 'rso' or 'sgd', got {config.optimizer!r}")
        self.sigmas = self.opt.sigmas if config.optimizer == "rso" else {}
        check_writable(self.out)

    @property
    def rounds_done(self):
        return self.history[-1]["round"] if self.history else 0

    def _set_eval_stats(self):
        """Batch-norm statistics for evaluation (no-op without batch norm): estimated over the evaluation
        training images, or those of the reference images (the authors' reset)."""
        if self.config.eval_bn_stats == "reference":
            self.model.set_reference_stats(self.x_train[:self.n_reference])
        else:
            self.model.estimate_population_stats(self.x_eval)

    def _evaluate(self):
        self._set_eval_stats()
        tl, ta = evaluate(self.model, self.x_eval, self.y_eval)
        vl, va = evaluate(self.model, self.x_test, self.y_test)
        return {"train_loss": tl, "train_acc": ta, "test_loss": vl, "test_acc": va}

    def _best(self):
        """The best test accuracy seen so far: after any round, or any layer pass (``eval_each_pass``)."""
        return running_best(self.history)[-1] if self.history else None

    def _after_pass(self, i, unit, picked):
        """After layer pass i of the round: its counts; with eval_each_pass the test set, as the authors'
        logs have it; a checkpoint with the position in the round. Neither is counted in the round's
        seconds."""
        synchronize(self.xp)
        took = time.perf_counter() - self._t
        self._seconds += took
        self._pass_seconds[unit.name] = took
        self._counts[unit.name] = [int((picked == k).sum()) for k in (PLUS, KEEP, MINUS)]
        if self.config.eval_each_pass:
            self._set_eval_stats()
            loss, acc = evaluate(self.model, self.x_test, self.y_test)
            self._passes.append({"pass": i, "unit": unit.name, "test_loss": loss, "test_acc": acc})
            best = max([self._best() or 0.0] + [p["test_acc"] for p in self._passes])
            self.log(f"      after {unit.name:<13} test loss {loss:.4f}, test acc {100 * acc:.2f}% "
                     f"(best {100 * best:.2f}%)")
        if i + 1 < len(self.opt.units):               # the last pass: the round's own checkpoint follows
            self.position = {"round": self._round, "passes_done": i + 1, "counts": self._counts,
                             "passes": self._passes, "seconds": self._seconds,
                             "pass_seconds": self._pass_seconds,
                             "perm_state": self.opt._perm_state}
            self.save()
        self._t = time.perf_counter()

    def _record(self, rnd, seconds, accepted, counts, updates, passes=None, pass_seconds=None):
        rec = {"round": rnd, **self._evaluate(), "accepted": accepted, "seconds": seconds,
               "weight_updates": updates}
        peak = peak_rss_bytes()
        if peak is not None:
            rec["peak_rss_bytes"] = peak      # of this process so far: a resumed run's from its resumption
        if counts is not None:
            rec["counts"] = counts
        if pass_seconds:
            rec["pass_seconds"] = pass_seconds
        if passes:
            rec["passes"] = passes
        self.history.append(rec)
        rec["best_test_acc"] = self._best()
        return rec

    def header(self):
        unit = "round" if self.config.optimizer == "rso" else "epoch"
        return (f"{unit:>5} | {'train loss':>10} | {'train acc':>9} | {'test loss':>9} | {'test acc':>8} | "
                f"{'best':>7} | {'accepted':>8} | {'seconds':>8}")

    @staticmethod
    def row(rec):
        acc = "" if rec["accepted"] is None else f"{100 * rec['accepted']:7.1f}%"
        best = rec.get("best_test_acc", rec["test_acc"])
        return (f"{rec['round']:5d} | {rec['train_loss']:10.4f} | {100 * rec['train_acc']:8.2f}% | "
                f"{rec['test_loss']:9.4f} | {100 * rec['test_acc']:7.2f}% | {100 * best:6.2f}% | {acc:>8} | "
                f"{rec['seconds']:8.1f}")

    def run(self, stop_after=None):
        """Train until ``config.rounds`` (or for ``stop_after`` rounds of this call); returns the history.

        The run folder is held for the time (``_io.folder_lock`` on its ``.rso_np.lock``): a second run
        started in the same folder while this one trains, a ``--resume`` of a run still going in the
        background say, stops with an error before it writes anything, where the two would otherwise
        overwrite each other's checkpoint and history."""
        with self._hold():
            return self._run(stop_after)

    @contextmanager
    def _hold(self):
        """The run folder's lock (``_io.folder_lock``), or an OSError naming the process that holds it (or
        saying that the folder cannot be written)."""
        with ExitStack() as stack:
            try:
                stack.enter_context(folder_lock(self.out, LOCK))
            except FolderBusy as exc:
                who = f"another process (pid {exc.pid})" if exc.pid else "another process"
                raise OSError(f"run folder {self.out}: {who} is training in it; wait for it to end, or stop it "
                              "(its checkpoint keeps what it has finished) and then --resume") from None
            except OSError as exc:
                raise cannot_write(self.out, exc) from None
            yield

    def _run(self, stop_after):
        cfg = self.config
        self.log(self.header())
        if not self.history:
            self.log(self.row(self._record(0, 0.0, None, None, 0)))
            self.save()
        else:
            self.log(f"(resumed after {self.rounds_done} of {cfg.rounds})" if self.rounds_done < cfg.rounds else
                     f"(the run has all its {cfg.rounds} {'rounds' if cfg.optimizer == 'rso' else 'epochs'}: "
                     "nothing to do; a longer run is a new one, with another --out)")
        last = cfg.rounds if stop_after is None else min(cfg.rounds, self.rounds_done + stop_after)
        for rnd in range(self.rounds_done + 1, last + 1):
            if cfg.optimizer == "rso":
                seconds, counts = self._rso_round(rnd)
                trials = sum(sum(c) for c in counts.values())
                accepted = sum(c[0] + c[2] for c in counts.values()) / trials
                updates = rnd
            else:
                t = time.perf_counter()
                self.opt.run_epoch(rnd)
                synchronize(self.xp)
                seconds, counts, accepted = time.perf_counter() - t, None, None
                updates = rnd * self.opt.steps_per_epoch()
            rso = cfg.optimizer == "rso"
            rec = self._record(rnd, seconds, accepted, counts, updates, self._passes if rso else None,
                               self._pass_seconds if rso else None)
            self.position = None
            self.log(self.row(rec))
            self.save()
        return self.history

    def _rso_round(self, rnd):
        """Round rnd of RSO, from where a stopped run left it: (seconds searching, counts per unit); the
        seconds of each layer pass (its store pass and trials, not the evaluation after it) are left in
        ``self._pass_seconds``."""
        pos = self.position if self.position and self.position["round"] == rnd else None
        start = pos["passes_done"] if pos else 0
        self._passes = pos["passes"] if pos else []
        self._counts = pos["counts"] if pos else {}
        self._seconds = pos["seconds"] if pos else 0.0
        self._pass_seconds = pos.get("pass_seconds", {}) if pos else {}
        if pos:
            self.log(f"      (round {rnd} resumed after {start} of {len(self.opt.units)} layer passes)")
            if pos.get("perm_state"):
                self.opt._shuffle(pos["perm_state"])        # the shuffle a batch-norm pass goes on with
        self._round, self._t = rnd, time.perf_counter()
        self.opt.run_round(rnd, start=start, after_pass=self._after_pass)
        return self._seconds + time.perf_counter() - self._t, self._counts

    def save(self):
        """Checkpoint, history.json, history.csv and loss.png, each atomically."""
        extra = {"run_config": np.array(self.config.to_json()), "rng_state": np.array(rng_state_json(self.rng)),
                 "history": np.array(json.dumps(self.history)), "sigmas": np.array(json.dumps(self.sigmas)),
                 "position": np.array(json.dumps(self.position))}
        if self.config.optimizer == "sgd":
            extra.update({f"velocity/{k}": to_device(v, "cpu") for k, v in self.opt.velocity.items()})
        self.model.save(self.out / CHECKPOINT, extra=extra)
        meta = {"optimizer": self.config.optimizer, "model": self.config.model, "dataset": self.config.dataset,
                "device": self.device, "settings": json.loads(self.config.to_json()), "history": self.history}
        atomic_write_text(self.out / "history.json", json.dumps(meta, indent=1))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(self.history)
        atomic_write_text(self.out / "history.csv", buf.getvalue())
        atomic_write_text(self.out / "history.md", history_markdown(meta))
        label = f"{self.config.optimizer.upper()} {self.config.model}"
        plot_runs([{"label": label, "optimizer": self.config.optimizer, "history": self.history}],
                  self.out / "loss.png", title=f"{label} on {self.config.dataset}")


def peak_rss_bytes():
    """The peak resident memory of this process so far, in bytes (``getrusage``'s ``ru_maxrss``: kibibytes
    on Linux, bytes on macOS); None where the system does not tell it (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def test_accuracies(rec):
    """The test accuracies a round's record holds: the one after the round, then those after its layer
    passes where the run evaluated after each (``eval_each_pass``)."""
    return [rec["test_acc"]] + [p["test_acc"] for p in rec.get("passes", ())]


def running_best(history):
    """The best test accuracy so far after each round of a history: after any round up to it, or any of
    those rounds' layer passes (``test_accuracies``)."""
    best, out = None, []
    for r in history:
        best = max(test_accuracies(r) + ([] if best is None else [best]))
        out.append(best)
    return out


def _pct(v):
    """An accuracy as the tables print it: 0.97654 -> '97.65%'."""
    return f"{100 * v:.2f}%"


def history_markdown(meta):
    """The history of a run (a history.json's contents) as a Markdown table, one row per round: losses,
    accuracies, the best test accuracy so far (after any round, or any layer pass where the run evaluated
    after each), for RSO the accepted share, and the seconds."""
    rso, hist = meta["optimizer"] == "rso", meta["history"]
    per_pass = any(r.get("passes") for r in hist)
    cols = ["round" if rso else "epoch", "train loss", "train acc", "test loss", "test acc",
            "best so far (per layer pass)" if per_pass else "best so far"] + (["accepted"] if rso else []) + ["seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for r, best in zip(hist, running_best(hist)):
        cells = [str(r["round"]), f"{r['train_loss']:.4f}", _pct(r["train_acc"]), f"{r['test_loss']:.4f}",
                 _pct(r["test_acc"]), _pct(best)]
        if rso:
            cells.append("" if r.get("accepted") is None else f"{100 * r['accepted']:.1f}%")
        cells.append(f"{r['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def runs_markdown(metas):
    """Several runs side by side (the seeds of one configuration, say) as a Markdown table, one row per
    round: each run's test accuracy after the round, with the best so far in brackets where it differs
    (after any round, or any layer pass where the run evaluated after each), and the runs' mean where every
    run has the round. A run's column is named by the settings that differ between the runs."""
    if len(metas) < 2:
        raise ValueError(f"a side-by-side table needs at least two runs, got {len(metas)}")
    flat = [_flat_settings(m.get("settings", {})) for m in metas]
    keys = sorted(set().union(*flat))
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    names = [", ".join(f"{k} {f.get(k)}" for k in differ) or f"run {i + 1}" for i, f in enumerate(flat)]
    columns = [{r["round"]: (r["test_acc"], best) for r, best in zip(m["history"], running_best(m["history"]))}
               for m in metas]                          # per run: {round: (test acc, best so far)}
    lines = ["| round | " + " | ".join(names) + " | mean |", "|" + "---:|" * (len(names) + 2)]
    for rnd in sorted(set().union(*columns)):
        cells = [str(rnd)]
        for col in columns:
            acc, best = col.get(rnd, (None, None))
            cells.append("" if acc is None else _pct(acc) + ("" if best == acc else f" ({_pct(best)})"))
        if all(rnd in col for col in columns):
            acc = sum(col[rnd][0] for col in columns) / len(columns)
            best = sum(col[rnd][1] for col in columns) / len(columns)
            cells.append(_pct(acc) + ("" if _pct(best) == _pct(acc) else f" ({_pct(best)})"))
        else:
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _flat_settings(settings):
    """A run's settings as it ran, with the nested ones (``rso``, ``sgd``) as ``rso.batch_size`` and so on.
    An option the run's record lacks (it was recorded before the option existed) has its default, as
    ``--resume`` reads it, and a recorded None for bn_eps or global_pool is the model's own value."""
    defaults = RunConfig().__dict__
    settings = {**defaults, **settings,
                **{k: {**defaults[k], **settings.get(k, {})} for k in ("rso", "sgd")}}
    settings["bn_eps"], settings["global_pool"] = model_options(settings["model"], settings["bn_eps"],
                                                                settings["global_pool"])
    out = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def load_run(path):
    """The history.json of a run folder (or the file itself), for ``plot`` and ``table``."""
    p = Path(path)
    f = p / "history.json" if p.is_dir() else p
    try:
        meta = json.loads(f.read_text())
        meta["history"]
    except FileNotFoundError:
        raise ValueError(f"{f}: no such file (not a run folder written by 'train')") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{f}: not a history.json written by 'train' ({exc})") from None
    return meta
