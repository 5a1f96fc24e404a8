"""Command line: ``python -m rso_np train`` and ``python -m rso_np plot`` (also installed as ``rso-np``)."""

import argparse
import sys
from datetime import datetime
from pathlib import Path

from .backend import DeviceError
from .data import DATASETS
from .models import MODELS
from .progress import Progress
from .rso import LAYER_ORDERS, SIGMA_SCHEDULES, RSOConfig
from .sgd import SGDConfig

PROG = "rso-np"

# The authors' MNIST configuration (see the paper notes): their network with batch norm, minibatch 5000,
# sigma decayed linearly to sigma/10, weight decay 1e-4, batch-norm parameters searched, 50 rounds.
PRESETS = {
    "paper": {"model": "paper_mnist_bn", "batch_size": 5000, "sigma_schedule": "linear",
              "weight_decay": 1e-4, "search_bn": True, "rounds": 50},
}

# Defaults for a laptop CPU: small_mnist (4,568 weights), minibatch 1024 and the fast engine, so that a
# round takes about a minute.
LAPTOP = {"model": "small_mnist", "rounds": 10, "epochs": 10, "sigma_schedule": "linear", "weight_decay": 0.0,
          "search_bn": True}


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


def build_parser():
    p = Parser(prog=PROG, description="RSO (gradient-free random search) and SGD training of small CNNs "
                                      "on MNIST, in NumPy/CuPy.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a model with RSO or SGD", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=(
                           "Train a CNN on MNIST or Fashion-MNIST with RSO (default) or SGD.\n\n"
                           "The plain defaults are for a laptop CPU: small_mnist, minibatch 1024, 10 rounds, "
                           "the fast engine\n(about a minute per round on two cores).\n"
                           "--preset paper sets the authors' MNIST configuration instead (paper_mnist_bn, "
                           "minibatch 5000,\nsigma decayed to sigma/10, weight decay 1e-4, 50 rounds); it is "
                           "meant for a GPU.\n\n"
                           "Writes history.json, history.csv, loss.png and checkpoint.npz into --out after "
                           "every round."))
    g = t.add_argument_group("data and model")
    g.add_argument("--dataset", choices=DATASETS, default="mnist", help="(default: mnist)")
    g.add_argument("--data-dir", metavar="DIR",
                   help="folder holding the four .gz files (offline use); default: download into $RSO_NP_DATA "
                        "or ~/.cache/rso_np")
    g.add_argument("--model", choices=sorted(MODELS), help="network (default: small_mnist; paper preset: "
                                                            "paper_mnist_bn)")
    g.add_argument("--train-limit", type=positive_int, metavar="N", help="use the first N training images")
    g.add_argument("--test-limit", type=positive_int, metavar="N", help="use the first N test images")
    g.add_argument("--eval-train-limit", type=positive_int, default=10000, metavar="N",
                   help="training images used for the per-round train loss/accuracy (default: 10000)")
    g = t.add_argument_group("run")
    g.add_argument("--optimizer", choices=("rso", "sgd"), default="rso", help="(default: rso)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="'paper': the authors' MNIST configuration")
    g.add_argument("--rounds", type=positive_int, help="RSO rounds (default: 10; paper: 50)")
    g.add_argument("--epochs", type=positive_int, help="SGD epochs (default: 10)")
    g.add_argument("--batch-size", type=positive_int,
                   help=f"minibatch (default: RSO {RSOConfig.batch_size}, paper 5000; SGD {SGDConfig.batch_size})")
    g.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="cpu (NumPy) or gpu (CuPy)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation and every random draw")
    g.add_argument("--out", metavar="DIR", help="run folder (default: runs/<optimizer>-<model>-<time>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its saved settings "
                        "(--rounds/--epochs may raise the total)")
    g.add_argument("--stop-after", type=positive_int, metavar="N",
                   help="stop after N rounds/epochs of this invocation (continue later with --resume)")
    g.add_argument("--no-progress", action="store_true", help="no progress inside rounds (default: a bar with trials per second, time left and "
                        "the layer searched; a line a minute when stderr is a file)")
    g = t.add_argument_group("RSO options (defaults: see rso_np/rso.py RSOConfig)")
    g.add_argument("--engine", choices=("fast", "literal"), default="fast",
                   help="fast (exact shortcuts, same decisions; default) or literal (Algorithm 1 line by line)")
    g.add_argument("--sigma-schedule", choices=SIGMA_SCHEDULES,
                   help="linear: decay to sigma/10 over the rounds (paper, default); constant")
    g.add_argument("--weight-decay", type=float, help="before each trial w *= 1 - wd (default 0; authors 1e-4)")
    g.add_argument("--no-search-bn", dest="search_bn", action="store_false", default=None,
                   help="do not search batch-norm scale/shift (the authors do, with sigma 0.167)")
    g.add_argument("--bn-sigma", type=float, default=RSOConfig.bn_sigma, help="(default: 0.167, authors)")
    g.add_argument("--layer-order", choices=LAYER_ORDERS, default="last-to-first",
                   help="last-to-first (paper, default) or first-to-last (ablation)")
    g.add_argument("--loss-agg", choices=("sum", "mean"), default="sum",
                   help="minibatch loss: sum (the paper's F, default) or mean")
    g = t.add_argument_group("SGD options")
    g.add_argument("--lr", type=float, default=SGDConfig.lr, help=f"(default: {SGDConfig.lr})")
    g.add_argument("--momentum", type=float, default=SGDConfig.momentum, help=f"(default: {SGDConfig.momentum})")
    g.add_argument("--sgd-weight-decay", type=float, default=SGDConfig.weight_decay,
                   help=f"(default: {SGDConfig.weight_decay})")
    g.add_argument("--lr-schedule", choices=("linear", "constant"), default=SGDConfig.lr_schedule,
                   help="linear: lr falls to 0 over the run (default); constant")

    pl = sub.add_parser("plot", help="overlay the loss and accuracy of several runs (e.g. RSO vs SGD)")
    pl.add_argument("runs", nargs="+", metavar="DIR", help="run folders written by 'train'")
    pl.add_argument("--out", required=True, metavar="FILE", help="image to write (e.g. compare.png)")
    pl.add_argument("--x", choices=("rounds", "updates"), default="rounds",
                    help="x-axis: rounds/epochs, or weight updates (the paper's comparison)")
    pl.add_argument("--title", help="figure title")
    return p


def run_config(args):
    from .training import RunConfig
    preset = PRESETS.get(args.preset, {}) if args.preset else {}
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset.get(name, LAPTOP[name])
    rso_cfg = RSOConfig(batch_size=args.batch_size or preset.get("batch_size") or RSOConfig.batch_size,
                        sigma_schedule=pick("sigma_schedule"), weight_decay=pick("weight_decay"),
                        search_batch_norm=pick("search_bn"), bn_sigma=args.bn_sigma,
                        layer_order=args.layer_order, loss_agg=args.loss_agg).validate()
    sgd_cfg = SGDConfig(batch_size=args.batch_size or SGDConfig.batch_size, lr=args.lr, momentum=args.momentum,
                        weight_decay=args.sgd_weight_decay, lr_schedule=args.lr_schedule).validate()
    if args.resume:
        total = args.rounds or args.epochs   # None: keep the saved total
    else:
        rounds = args.rounds if args.optimizer == "rso" else args.epochs
        total = rounds or (preset.get("rounds", LAPTOP["rounds"]) if args.optimizer == "rso" else LAPTOP["epochs"])
    return RunConfig(optimizer=args.optimizer, engine=args.engine, model=pick("model"), dataset=args.dataset,
                     rounds=total,
                     seed=args.seed, train_limit=args.train_limit, test_limit=args.test_limit,
                     eval_train_limit=args.eval_train_limit, rso=rso_cfg.to_dict(), sgd=sgd_cfg.to_dict())


def cmd_train(args):
    from .training import Trainer
    if args.resume and not args.out:
        raise UsageError(f"{PROG} train: error: --resume needs --out DIR (the run folder to continue)")
    cfg = run_config(args)
    out = args.out or str(Path("runs") / f"{cfg.optimizer}-{cfg.model}-{datetime.now():%Y%m%d-%H%M%S}")
    show = not args.no_progress
    unit = "trial" if cfg.optimizer == "rso" else "step"
    trainer = Trainer(cfg, out, device=args.device, data_dir=args.data_dir, resume=args.resume,
                      log=lambda s: print(s, flush=True), progress=Progress(unit=unit) if show else None)
    c = trainer.config
    engine = f" ({c.engine} engine)" if c.optimizer == "rso" else ""
    print(f"{c.optimizer.upper()}{engine} on {c.dataset} ({trainer.x_train.shape[0]} train / {trainer.x_test.shape[0]} "
          f"test images), model {c.model} ({trainer.model.num_weights()} weights), device {args.device}, "
          f"{c.rounds} {'rounds' if c.optimizer == 'rso' else 'epochs'}, writing to {out}", flush=True)
    trainer.run(stop_after=args.stop_after)
    print(f"done: {out}/loss.png, {out}/history.csv, {out}/checkpoint.npz")


def cmd_plot(args):
    from .plotting import plot_runs
    from .training import load_run
    runs = []
    for d in args.runs:
        meta = load_run(d)
        runs.append({"label": f"{meta['optimizer'].upper()} {meta['model']}", "optimizer": meta["optimizer"],
                     "history": meta["history"]})
    out = Path(args.out)
    if not out.parent.exists():
        raise OSError(f"--out {out}: folder {out.parent} does not exist")
    plot_runs(runs, out, x=args.x, title=args.title)
    print(f"wrote {out}")


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        if args.command == "train":
            cmd_train(args)
        else:
            cmd_plot(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (ValueError, OSError, DeviceError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; the last finished round is in checkpoint.npz (continue with --resume)",
              file=sys.stderr)
        return 130
    return 0
