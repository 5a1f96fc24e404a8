"""The loss and accuracy figure: log loss, logit accuracy, so that late rounds stay readable."""

import matplotlib.pyplot as plt
import pytest

from rso_np.plotting import plot_runs, runs_figure


def _history(accs):
    return [{"round": r, "weight_updates": r, "train_loss": 2.0 / (r + 1), "test_loss": 2.1 / (r + 1),
             "test_acc": a} for r, a in enumerate(accs)]


def test_axes_scales_and_accuracy_ticks():
    run = {"label": "rso", "optimizer": "rso", "history": _history([0.11, 0.83, 0.94, 0.975, 0.984, 0.986])}
    fig = runs_figure([run])
    try:
        ax_loss, ax_acc = fig.axes
        assert ax_loss.get_yscale() == "log" and ax_acc.get_yscale() == "logit"
        # the accuracies are plotted as fractions (a logit axis needs them in (0, 1)), labelled in percent
        assert list(ax_acc.lines[0].get_ydata()) == [0.11, 0.83, 0.94, 0.975, 0.984, 0.986]
        fig.canvas.draw()
        lo, hi = ax_acc.get_ylim()
        labels = {t.get_text() for t in ax_acc.get_yticklabels() if lo <= t.get_position()[1] <= hi}
        assert {"10%", "50%", "90%", "95%", "98%"} <= labels
        # 0.984 and 0.986 sit well apart: more than 1% of the axis (on a linear one, 0.2% of it)
        y = ax_acc.transData.transform([(0, 0.984), (0, 0.986)])[:, 1]
        assert abs(y[1] - y[0]) > 0.01 * ax_acc.bbox.height
    finally:
        plt.close(fig)


def test_plot_runs_writes_png_and_checks_axis(tmp_path):
    run = {"label": "sgd", "optimizer": "sgd", "history": _history([0.1, 0.97, 0.99])}
    plot_runs([run], tmp_path / "f.png", x="updates")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="x must be one of"):
        plot_runs([run], tmp_path / "g.png", x="epochs")
    assert not (tmp_path / "g.png").exists()
