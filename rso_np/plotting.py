"""Plots of loss and accuracy per round (RSO) or epoch (SGD), for one run or several side by side."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from ._io import atomic_path

X_AXES = ("rounds", "updates")


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
    """Loss (left) and test accuracy (right) of one or more runs.

    ``runs``: list of dicts with "label", "optimizer" and "history" (the records of history.json).
    ``x``: "rounds" (round/epoch number) or "updates" (weight updates, the paper's comparison).
    """
    if x not in X_AXES:
        raise ValueError(f"x must be one of {X_AXES}, got {x!r}")
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    for i, run in enumerate(runs):
        h = run["history"]
        xs = _xs(h, x)
        color = f"C{i}"
        ax_l.plot(xs, [r["train_loss"] for r in h], "-o", color=color, ms=3, label=f"{run['label']} train")
        ax_l.plot(xs, [r["test_loss"] for r in h], "--s", color=color, ms=3, label=f"{run['label']} test")
        ax_a.plot(xs, [100 * r["test_acc"] for r in h], "-o", color=color, ms=3, label=run["label"])
    ax_l.set_ylabel("cross-entropy loss (mean)")
    ax_a.set_ylabel("test accuracy (%)")
    for ax in (ax_l, ax_a):
        ax.set_xlabel(_xlabel(runs, x))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if x == "updates":
            ax.set_xscale("symlog", linthresh=1)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _atomic_savefig(fig, path)


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
