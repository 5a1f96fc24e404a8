"""Plots of loss and accuracy per round (RSO) or epoch (SGD), for one run or several side by side."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

from ._io import atomic_path

X_AXES = ("rounds", "updates")
# the accuracy axis's ticks: 1-2-5 steps away from 0% and from 100% alike, as the logit scale spaces them
ACC_TICKS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)


def _atomic_savefig(fig, path):
    try:
        with atomic_path(path, suffix=os.path.splitext(os.fspath(path))[1] or ".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


def _xs(history, x):
    return [r["weight_updates"] if x == "updates" else r["round"] for r in history]


def _xlabel(runs, x):
    if x == "updates":
        return "weight updates (times each weight was updated)"
    kinds = {r["optimizer"] for r in runs}
    return "round" if kinds == {"rso"} else "epoch" if kinds == {"sgd"} else "round (RSO) / epoch (SGD)"


def plot_runs(runs, path, x="rounds", title=None):
    """Loss (left) and test accuracy (right) of one or more runs, saved to ``path``.

    ``runs``: list of dicts with "label", "optimizer" and "history" (the records of history.json).
    ``x``: "rounds" (round/epoch number) or "updates" (weight updates, the paper's comparison).
    """
    _atomic_savefig(runs_figure(runs, x, title), path)


def runs_figure(runs, x="rounds", title=None):
    """The figure of ``plot_runs``. The loss has a log axis and the accuracy a logit one (10%, 50%, 90%,
    99%, ... about equally spaced), so that the late rounds' tenths of a point stay visible beside round 0."""
    if x not in X_AXES:
        raise ValueError(f"x must be one of {X_AXES}, got {x!r}")
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    for i, run in enumerate(runs):
        h = run["history"]
        xs = _xs(h, x)
        color = f"C{i}"
        ax_l.plot(xs, [r["train_loss"] for r in h], "-o", color=color, ms=3, label=f"{run['label']} train")
        ax_l.plot(xs, [r["test_loss"] for r in h], "--s", color=color, ms=3, label=f"{run['label']} test")
        ax_a.plot(xs, [r["test_acc"] for r in h], "-o", color=color, ms=3, label=run["label"])
    ax_l.set_yscale("log")
    ax_l.set_ylabel("cross-entropy loss (mean, log scale)")
    ax_a.set_yscale("logit")
    ax_a.yaxis.set_major_locator(FixedLocator(ACC_TICKS))
    ax_a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
    ax_a.yaxis.set_minor_formatter(NullFormatter())
    ax_a.set_ylabel("test accuracy (logit scale)")
    for ax, where in ((ax_l, "upper right"), (ax_a, "lower right")):
        ax.set_xlabel(_xlabel(runs, x))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc=where)
        if x == "updates":
            ax.set_xscale("symlog", linthresh=1)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_sweep(curves, path, title=None):
    """Test accuracy per round of a sweep's points, grouped by their settings other than the seed: the mean
    over seeds as a line, +- one standard deviation as a band.

    ``curves``: list of (settings dict, rounds, test accuracies) per point.
    """
    import numpy as np
    groups = {}
    for settings, rounds, accs in curves:
        key = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "seed") or "all points"
        groups.setdefault(key, []).append((rounds, accs))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (key, runs) in enumerate(sorted(groups.items())):
        n = min(len(r) for r, _ in runs)                     # the rounds every seed has reached
        acc = 100 * np.array([a[:n] for _, a in runs])
        m, s = acc.mean(axis=0), acc.std(axis=0)
        xs = runs[0][0][:n]
        ax.plot(xs, m, "-o", ms=3, color=f"C{i}", label=f"{key} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        ax.fill_between(xs, m - s, m + s, color=f"C{i}", alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%), mean +- std over seeds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    _atomic_savefig(fig, path)
