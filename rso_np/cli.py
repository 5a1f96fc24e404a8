"""Command line: ``python -m rso_np train`` and ``python -m rso_np plot`` (also installed as ``rso-np``)."""

import argparse
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path

from .backend import DeviceError
from .data import DATASETS, NORMALIZATIONS
from .training import EVAL_BN_STATS
from .models import GLOBAL_POOLS, MODELS, model_options
from .progress import Progress
from .rso import AUTHORS, BN_STATISTICS, LAYER_ORDERS, MINIBATCHES, SIGMA_FROM, SIGMA_SCHEDULES, RSOConfig
from .sgd import SGDConfig

PROG = "rso-np"

# The authors' MNIST configuration, as their MXNet code runs it (see the paper notes and rso.AUTHORS): their
# network with batch norm (MXNet's epsilon 1e-3) and global max pooling (MXNet's default pool_type),
# minibatch 5000, 50 rounds, inputs centred, batch-norm statistics frozen before the searched layer, chunked
# minibatches, He sigma with the authors' schedule, weight decay 1e-4 on every searched parameter, batch norm
# searched right after its conv, evaluation with the statistics of the first 2000 training images after
# every layer pass.
PRESETS = {
    "paper": {"model": "paper_mnist_bn", "batch_size": 5000, "rounds": 50, "normalize": "center", "bn_eps": 1e-3,
              "global_pool": "max", "eval_bn_stats": "reference", "eval_each_pass": True, **AUTHORS},
}

# Defaults for a laptop CPU: small_mnist (4,568 weights), minibatch 1024 and the fast engine, so that a
# round takes about a minute.
LAPTOP = {"model": "small_mnist", "rounds": 10, "epochs": 10}

class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):          # one line, exit status 2
        raise UsageError(f"{self.prog}: error: {message}")


def positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return v


def build_parser():
    p = Parser(prog=PROG, description="RSO (gradient-free random search) and SGD training of small CNNs "
                                      "on MNIST, in NumPy/CuPy.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a model with RSO or SGD", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=(
                           "Train a CNN on MNIST or Fashion-MNIST with RSO (default) or SGD.\n\n"
                           "The plain defaults are for a laptop CPU: small_mnist, minibatch 1024, 10 rounds, "
                           "the fast engine\n(about a minute per round on two cores), and the paper's "
                           "pseudocode for every search option.\n"
                           "--preset paper sets the authors' MNIST configuration instead, as their code runs "
                           "it: paper_mnist_bn\n(batch-norm epsilon 1e-3, global max pooling before the dense "
                           "layer), minibatch 5000, 50 rounds,\ninputs centred, batch-norm statistics frozen "
                           "before the searched layer, chunked minibatches,\nHe sigma with the authors' "
                           "schedule, weight decay 1e-4 on every searched parameter, batch norm\nsearched "
                           "right after its conv, evaluation after every layer pass. Options given with it "
                           "override\nit (e.g. --batch-size 2000); with --model paper_mnist or small_mnist it "
                           "leaves out the options those\nnetworks lack (batch norm's epsilon; small_mnist: the "
                           "global pooling).\n\n"
                           "Writes history.json, history.csv, history.md, loss.png and checkpoint.npz into "
                           "--out after every\nround; with RSO the checkpoint also after every layer pass. "
                           "--resume continues a run from its\ncheckpoint with its recorded settings; an "
                           "option that contradicts them is an error, as is a\nfolder where another process "
                           "is training."))
    g = t.add_argument_group("data and model")
    g.add_argument("--dataset", choices=DATASETS, help="(default: mnist)")
    g.add_argument("--data-dir", metavar="DIR",
                   help="folder holding the four .gz files (offline use); default: download into $RSO_NP_DATA "
                        "or ~/.cache/rso_np")
    g.add_argument("--model", choices=sorted(MODELS), help="network (default: small_mnist; paper preset: "
                                                            "paper_mnist_bn)")
    g.add_argument("--bn-eps", type=positive_float, metavar="EPS",
                   help="batch norm's epsilon (paper_mnist_bn; default 1e-5; authors, MXNet: 1e-3)")
    g.add_argument("--global-pool", choices=sorted(GLOBAL_POOLS),
                   help="the paper's networks: global pooling before the dense layer, avg (default) or max "
                        "(paper preset; authors: their MXNet code's nd.Pooling(global_pool=True) defaults to max)")
    g.add_argument("--normalize", choices=NORMALIZATIONS,
                   help="input: standardize (the paper: minus the training mean, over its std; default) or "
                        "center (authors: minus the mean only)")
    g.add_argument("--train-limit", type=positive_int, metavar="N", help="use the first N training images")
    g.add_argument("--test-limit", type=positive_int, metavar="N", help="use the first N test images")
    g.add_argument("--eval-train-limit", type=positive_int, metavar="N",
                   help="training images used for the per-round train loss/accuracy (default: 10000)")
    g.add_argument("--eval-bn-stats", choices=EVAL_BN_STATS,
                   help="batch-norm statistics for evaluation: population (estimated over the evaluation "
                        "training images; default) or reference (authors: those of the first 2000 training "
                        "images)")
    g.add_argument("--eval-each-pass", action=argparse.BooleanOptionalAction,
                   help="also evaluate the test set after every layer pass, and report the best so far "
                        "(authors; default: off)")
    g = t.add_argument_group("run")
    g.add_argument("--optimizer", choices=("rso", "sgd"), help="(default: rso)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="'paper': the authors' MNIST configuration")
    g.add_argument("--rounds", type=positive_int, help="RSO rounds: the length C of the sigma schedule (default: 10; paper: 50); "
                        "--stop-after N stops after N of them on the same schedule")
    g.add_argument("--epochs", type=positive_int, help="SGD epochs (default: 10)")
    g.add_argument("--batch-size", type=positive_int,
                   help=f"minibatch (default: RSO {RSOConfig.batch_size}, paper 5000; SGD {SGDConfig.batch_size})")
    g.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="cpu (NumPy) or gpu (CuPy)")
    g.add_argument("--seed", type=int, help="seed of the initialisation and every random draw (default: 0)")
    g.add_argument("--out", metavar="DIR", help="run folder (default: runs/<optimizer>-<model>-<time>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its recorded settings")
    g.add_argument("--stop-after", type=positive_int, metavar="N",
                   help="stop after N rounds/epochs of this invocation (continue later with --resume)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress inside rounds (default: a bar with trials per second, the layer searched "
                        "and the time left in the round, by each layer's pace in the previous round; a line a "
                        "minute when stderr is a file)")
    g = t.add_argument_group("RSO options (defaults: the paper's pseudocode, see rso_np/rso.py RSOConfig)")
    g.add_argument("--engine", choices=("fast", "literal"),
                   help="fast (exact shortcuts, same decisions; default) or literal (Algorithm 1 line by line)")
    g.add_argument("--minibatches", choices=MINIBATCHES,
                   help="draw (a new random minibatch per weight; default) or chunks (authors: consecutive "
                        "chunks of a shuffle per layer pass; where --batch-size does not divide the training "
                        "set, the images after the last whole chunk sit the pass out)")
    g.add_argument("--bn-statistics", choices=BN_STATISTICS,
                   help="minibatch (every batch norm uses the minibatch's statistics; default) or "
                        "frozen-before (authors: those before the searched layer use a reference batch's)")
    g.add_argument("--bn-reference-images", type=positive_int, metavar="N",
                   help="the reference batch: the first N training images (default and authors: 2000)")
    g.add_argument("--sigma-from", choices=SIGMA_FROM,
                   help="sigma_d: weights (std of the initial weights, the paper; default) or he "
                        "(sqrt(2/fan_in), authors)")
    g.add_argument("--sigma-schedule", choices=SIGMA_SCHEDULES,
                   help="linear: decay to sigma/10 over the rounds (paper, default); authors: "
                        "0.1 + 0.9 (C-c+1)/C; constant")
    g.add_argument("--weight-decay", type=float, help="before each trial w *= 1 - wd (default 0; authors 1e-4)")
    g.add_argument("--decay-bn", action=argparse.BooleanOptionalAction,
                   help="weight decay on batch-norm scale and shift too (authors: yes; default: no)")
    g.add_argument("--no-search-bn", dest="search_bn", action="store_false", default=None,
                   help="do not search batch-norm scale/shift (the authors do, with sigma 0.167)")
    g.add_argument("--bn-sigma", type=float, help="(default: 0.167, authors)")
    g.add_argument("--layer-order", choices=LAYER_ORDERS,
                   help="last-to-first (paper, default) or first-to-last (ablation)")
    g.add_argument("--bn-after-conv", action=argparse.BooleanOptionalAction,
                   help="search a batch norm's shift, then scale, right after its conv's weights (authors) "
                        "instead of as a layer of its own (default)")
    g.add_argument("--loss-agg", choices=("sum", "mean"), help="minibatch loss: sum (the paper's F, default) or mean")
    g = t.add_argument_group("SGD options")
    g.add_argument("--lr", type=float, help=f"(default: {SGDConfig.lr})")
    g.add_argument("--momentum", type=float, help=f"(default: {SGDConfig.momentum})")
    g.add_argument("--sgd-weight-decay", type=float, help=f"(default: {SGDConfig.weight_decay})")
    g.add_argument("--lr-schedule", choices=("linear", "constant"),
                   help="linear: lr falls to 0 over the run (default); constant")

    sw = sub.add_parser("sweep", help="run a grid of train runs (seeds, ablations) on Dask",
                        formatter_class=argparse.RawDescriptionHelpFormatter, description=(
                            "Run every point of a SPEC file (TOML or JSON: [base] train options, [axes] lists "
                            "of values,\noptional out = folder) as an ordinary run folder under the sweep's "
                            "folder, on a Dask\nLocalCluster (one single-threaded worker per core) or on "
                            "--scheduler ADDRESS. Finished points\nare skipped, unfinished ones go on from "
                            "their checkpoints; a failed point is reported and the\nothers go on. Writes "
                            "sweep.csv, sweep.md and sweep.png. Exit status 0 when every point finished,\n1 "
                            "when some failed, 2 for a bad SPEC."))
    sw.add_argument("spec", metavar="SPEC", help="the sweep's .toml or .json file")
    sw.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler (e.g. tcp://host:8786)")
    sw.add_argument("--workers", type=positive_int, metavar="N", help="LocalCluster workers (default: one per core)")
    sw.add_argument("--report", action="store_true", help="only write the table and figure of the points so far")

    pl = sub.add_parser("plot", help="overlay the loss and accuracy of several runs (e.g. RSO vs SGD)")
    pl.add_argument("runs", nargs="+", metavar="DIR", help="run folders written by 'train'")
    pl.add_argument("--out", required=True, metavar="FILE", help="image to write (e.g. compare.png)")
    pl.add_argument("--x", choices=("rounds", "updates"), default="rounds",
                    help="x-axis: rounds/epochs, or weight updates (the paper's comparison)")
    pl.add_argument("--title", help="figure title")
    pl.add_argument("--label", action="append", metavar="TEXT",
                    help="a run's name in the legend, once per DIR in their order (default: optimiser and model, "
                         "and the folder's name where two runs would share one)")

    tb = sub.add_parser("table", help="print a run's history as a Markdown table (one row per round), or "
                                      "several runs' test accuracies side by side",
                        description="Print the history of a run folder written by 'train' as a Markdown "
                                    "table: losses, accuracies, the best test accuracy so far (after any layer "
                                    "pass where the run evaluated after each), the accepted share and the "
                                    "seconds of each round. 'train' writes the same into history.md. With "
                                    "several folders (the seeds of one configuration, say): one row per round, "
                                    "each run's test accuracy (the best so far in brackets where it differs) "
                                    "and their mean, each run's column named by the settings that differ.")
    tb.add_argument("run", metavar="DIR", nargs="+", help="a run folder written by 'train' (or its history.json)")
    return p


def train_option_names():
    """The names (argparse dests, e.g. ``batch_size``) of every ``train`` option: those of a plain
    ``train`` command line, parsed."""
    return set(vars(build_parser().parse_args(["train"]))) - {"command"}


# Where each train option lands in a RunConfig: dest -> (section, field); section None: the RunConfig itself.
RUN_FIELDS = {"optimizer": (None, "optimizer"), "engine": (None, "engine"), "model": (None, "model"),
              "dataset": (None, "dataset"), "seed": (None, "seed"), "train_limit": (None, "train_limit"),
              "test_limit": (None, "test_limit"), "eval_train_limit": (None, "eval_train_limit"),
              "normalize": (None, "normalize"), "bn_eps": (None, "bn_eps"), "eval_bn_stats": (None, "eval_bn_stats"),
              "eval_each_pass": (None, "eval_each_pass"), "global_pool": (None, "global_pool")}
RSO_FIELDS = {"minibatches": "minibatches", "bn_statistics": "bn_statistics",
              "bn_reference_images": "bn_reference_images", "sigma_from": "sigma_from",
              "sigma_schedule": "sigma_schedule", "weight_decay": "weight_decay", "decay_bn": "decay_bn",
              "search_bn": "search_batch_norm", "bn_sigma": "bn_sigma", "layer_order": "layer_order",
              "bn_after_conv": "bn_after_conv", "loss_agg": "loss_agg"}
SGD_FIELDS = {"lr": "lr", "momentum": "momentum", "sgd_weight_decay": "weight_decay", "lr_schedule": "lr_schedule"}


def given_settings(args):
    """{(option, section, field): value} for every setting given on the command line (a preset's count as
    given), section None / "rso" / "sgd"."""
    preset = dict(PRESETS.get(args.preset, {})) if args.preset else {}
    model = args.model or preset.get("model") or LAPTOP["model"]
    for dest, have in zip(("bn_eps", "global_pool"), model_options(model)):
        if have is None:                # an option of the preset's network that the model given lacks
            preset.pop(dest, None)      # (--preset paper --model paper_mnist: no batch norm)
    value = lambda dest: getattr(args, dest) if getattr(args, dest, None) is not None else preset.get(dest)
    out = {}
    for dest, (section, field) in RUN_FIELDS.items():
        out[(dest, section, field)] = value(dest)
    for dest, field in RSO_FIELDS.items():
        out[(dest, "rso", field)] = value(dest)
    for dest, field in SGD_FIELDS.items():
        out[(dest, "sgd", field)] = value(dest)
    optimizer = value("optimizer") or "rso"
    out[("batch_size", optimizer, "batch_size")] = value("batch_size")
    out[("rounds" if optimizer == "rso" else "epochs", None, "rounds")] = \
        value("rounds") if optimizer == "rso" else value("epochs")
    return {k: v for k, v in out.items() if v is not None}


def run_config(args):
    """The RunConfig of a new run: each setting from the command line, else the preset, else the default."""
    from .training import RunConfig
    run, rso, sgd = {"rounds": LAPTOP["rounds"], "model": LAPTOP["model"]}, {}, {}
    for (dest, section, field), v in given_settings(args).items():
        {None: run, "rso": rso, "sgd": sgd}[section][field] = v
    if run.get("optimizer") == "sgd":
        run["rounds"] = args.epochs or LAPTOP["epochs"]
    return RunConfig(rso=RSOConfig(**rso).validate().to_dict(), sgd=SGDConfig(**sgd).validate().to_dict(), **run)


def _option(dest):
    return "--" + {"search_bn": "no-search-bn"}.get(dest, dest.replace("_", "-"))


def check_resume(args, saved):
    """A resumed run keeps its recorded settings: any given option that differs ends with a UsageError
    naming it, the run's value and the given one."""
    for (dest, section, field), v in given_settings(args).items():
        have = getattr(saved, field) if section is None else getattr(saved, section).get(field)
        if field == "bn_eps":                         # None: the model's default, which the run has
            have = model_options(saved.model, bn_eps=have)[0]
        elif field == "global_pool":
            have = model_options(saved.model, global_pool=have)[1]
        if section in ("rso", "sgd") and section != saved.optimizer:
            continue                                  # the other optimiser's options do not apply
        if have != v and not (isinstance(v, float) and have is not None and float(have) == v):
            raise UsageError(f"{PROG} train: error: {_option(dest)}: the run in {args.out} has {have!r}, "
                             f"given {v!r} (a resumed run keeps its settings; start a new run with another --out)")


def cmd_train(args):
    from .training import Trainer
    if args.resume and not args.out:
        raise UsageError(f"{PROG} train: error: --resume needs --out DIR (the run folder to continue)")
    if args.resume:
        from .training import saved_run_config
        cfg = saved_run_config(args.out)
        check_resume(args, cfg)
    else:
        cfg = run_config(args)
    out = args.out or str(Path("runs") / f"{cfg.optimizer}-{cfg.model}-{datetime.now():%Y%m%d-%H%M%S}")
    show = not args.no_progress
    unit = "trial" if cfg.optimizer == "rso" else "step"
    trainer = Trainer(cfg, out, device=args.device, data_dir=args.data_dir, resume=args.resume,
                      log=lambda s: print(s, flush=True), progress=_Checked(Progress(unit=unit) if show else None))
    c, n, B = trainer.config, trainer.x_train.shape[0], trainer.config.rso["batch_size"]
    engine = f" ({c.engine} engine)" if c.optimizer == "rso" else ""
    print(f"{c.optimizer.upper()}{engine} on {c.dataset} ({n} train / {trainer.x_test.shape[0]} "
          f"test images), model {c.model} ({trainer.model.num_weights()} weights), device {args.device}, "
          f"{c.rounds} {'rounds' if c.optimizer == 'rso' else 'epochs'}, writing to {out}", flush=True)
    if c.optimizer == "rso" and c.rso["minibatches"] == "chunks" and n % B:
        print(f"note: --minibatches chunks with --batch-size {B}: {n // B} chunks per layer pass; the last "
              f"{n % B} images of each pass's shuffle sit that pass out (a batch size that divides {n} uses "
              "them all)", flush=True)
    trainer.run(stop_after=args.stop_after)
    print(f"done: {out}/loss.png, {out}/history.csv, {out}/checkpoint.npz")


def cmd_plot(args):
    from .plotting import plot_runs
    from .training import load_run
    if args.label is not None and len(args.label) != len(args.runs):
        raise UsageError(f"{PROG} plot: error: --label: given {len(args.label)} times for {len(args.runs)} runs "
                         "(one per DIR, in their order)")
    runs = []
    for d in args.runs:
        meta = load_run(d)
        runs.append({"label": f"{meta['optimizer'].upper()} {meta['model']}", "optimizer": meta["optimizer"],
                     "history": meta["history"]})
    defaults = [r["label"] for r in runs]
    for i, (run, d) in enumerate(zip(runs, args.runs)):
        if args.label is not None:
            run["label"] = args.label[i]
        elif defaults.count(run["label"]) > 1:             # same optimiser and model: tell them apart
            run["label"] += f" ({Path(d).resolve().name})"
    out = Path(args.out)
    if not out.parent.exists():
        raise OSError(f"--out {out}: folder {out.parent} does not exist")
    plot_runs(runs, out, x=args.x, title=args.title)
    print(f"wrote {out}")


def cmd_table(args):
    from .training import history_markdown, load_run, runs_markdown
    metas = [load_run(r) for r in args.run]
    print(history_markdown(metas[0]) if len(metas) == 1 else runs_markdown(metas), end="")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill PID``; a batch system or container stopping the job) taken as Ctrl-C is: the run stops
    where it is and its last checkpoint stands. A job started in the background from a script ignores
    Ctrl-C's SIGINT (the shell sets it so), so a plain ``kill`` is how it is stopped."""


# The stop signal received, if any. A handler's exception is raised wherever Python happens to be; when that
# is a finaliser (``__del__``) or a weakref callback, Python swallows it and passes it to sys.unraisablehook,
# whose default prints "Exception ignored in ..." and a traceback. The signal stays recorded here, so the run
# still stops: at its next trial (``_Checked``), or as it returns; ``_quiet_about_stops`` keeps the traceback
# of such a swallowed stop off the screen. ``main()`` clears it on return.
_stop_signal = None


def _stop(signum, frame):
    global _stop_signal
    _stop_signal = signum
    _raise_if_stopped()


def _raise_if_stopped():
    if _stop_signal is not None:
        raise Terminated if _stop_signal == signal.SIGTERM else KeyboardInterrupt


def _quiet_about_stops(unraisable_hook):
    """``sys.unraisablehook`` that is silent about a stop whose exception Python swallowed (it is raised again
    later) and passes anything else to ``unraisable_hook``."""
    def hook(unraisable):
        if not (_stop_signal is not None and issubclass(unraisable.exc_type, KeyboardInterrupt)):
            unraisable_hook(unraisable)
    return hook


class _Checked:
    """The progress hook (``None``: none) behind a check, made after every trial or step, for a stop signal
    whose exception Python swallowed."""

    def __init__(self, progress):
        self.progress = progress

    def __call__(self, done, total, what):
        _raise_if_stopped()
        if self.progress is not None:
            self.progress(done, total, what)

    def __getattr__(self, name):               # the hook's other methods (``remember``), where it has them
        progress = self.__dict__.get("progress")   # (not self.progress: a copy has no attributes yet)
        if progress is None:
            raise AttributeError(name)
        return getattr(progress, name)


def main(argv=None):
    # SIGTERM stops a command as Ctrl-C does (Terminated): with the message below, the lock released, no
    # half-written file. Ctrl-C's SIGINT goes through the same handler, unless it is ignored (a background
    # job). Only the main thread may set handlers; the ones before are put back on return.
    global _stop_signal
    before, unraisable_hook = {}, sys.unraisablehook
    if threading.current_thread() is threading.main_thread():
        before[signal.SIGTERM] = signal.signal(signal.SIGTERM, _stop)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            before[signal.SIGINT] = signal.signal(signal.SIGINT, _stop)
        sys.unraisablehook = _quiet_about_stops(unraisable_hook)
    try:
        return _main(argv)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        sys.unraisablehook = unraisable_hook
        _stop_signal = None                     # acted on: a later main() or hook in this process starts clean


def _main(argv):
    try:
        args = build_parser().parse_args(argv)
        if args.command == "train":
            cmd_train(args)
            _raise_if_stopped()                 # a stop after the last trial, which Python swallowed
        elif args.command == "sweep":
            from .sweep import main as sweep_main
            return sweep_main(args.spec, args.scheduler, args.workers, args.report)
        elif args.command == "table":
            cmd_table(args)
        else:
            cmd_plot(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (ValueError, OSError, DeviceError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        term = isinstance(exc, Terminated)
        print(f"\n{PROG}: {'stopped by SIGTERM' if term else 'interrupted'}; checkpoint.npz holds the run up to "
              "its last finished round (RSO: layer pass); continue with --resume", file=sys.stderr)
        return 128 + (signal.SIGTERM if term else signal.SIGINT)
    return 0
