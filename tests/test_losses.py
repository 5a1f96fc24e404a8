import numpy as np
import pytest
from scipy.special import logsumexp

from rso_np.backend import get_array_module
from rso_np.losses import accuracy, logit_cross_entropy


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("agg", ["mean", "sum"])
def test_cross_entropy_vs_scipy_logsumexp(xp, rng, scale, agg):
    z = (rng.standard_normal((37, 10)) * scale).astype(np.float32)
    y = rng.integers(0, 10, 37)
    loss = logit_cross_entropy(xp.asarray(z), xp.asarray(y), agg=agg)
    assert get_array_module(loss) is xp
    z64 = z.astype(np.float64)
    per = logsumexp(z64, axis=1) - z64[np.arange(37), y]
    ref = per.sum() if agg == "sum" else per.mean()
    assert np.isfinite(float(loss))
    assert abs(float(loss) - ref) / max(abs(ref), 1e-12) < 1e-5


def test_accuracy(xp):
    z = xp.asarray(np.array([[1, 2, 0], [3, 0, 0], [0, 0, 5], [1, 0, 0]], np.float32))
    y = xp.asarray(np.array([1, 0, 1, 0]))
    assert accuracy(z, y) == 0.75


@pytest.mark.parametrize("labels,match", [
    (np.array([0, 1, 10]), r"labels must lie in \[0, 9\], got 10"),
    (np.array([0, -1, 2]), r"labels must lie in \[0, 9\], got -1"),
    (np.array([0, 1]), r"labels must have length 3 .* got 2"),
    (np.array([0.0, 1.0, 2.0]), r"labels must hold integers .* float64"),
])
def test_bad_labels(labels, match):
    z = np.zeros((3, 10), np.float32)
    with pytest.raises(ValueError, match=match):
        logit_cross_entropy(z, labels)


def test_bad_logits():
    z = np.zeros((3, 10), np.float32)
    z[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"logits contains 1 NaN or infinite"):
        logit_cross_entropy(z, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"agg must be one of \('mean', 'sum'\), got 'max'"):
        logit_cross_entropy(np.zeros((3, 10), np.float32), np.array([0, 1, 2]), agg="max")
