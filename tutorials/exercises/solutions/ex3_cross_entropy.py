"""Solution to exercise 3 (for teachers)."""

import numpy as np


def logit_cross_entropy(logits, labels):
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float((lse - z[np.arange(z.shape[0]), labels]).mean())
