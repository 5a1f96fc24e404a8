"""Solution to exercise 4 (for teachers)."""

import numpy as np

from rso_np.losses import logit_cross_entropy


def rso_step(model, name, j, x, y, dw):
    W = model.parameters()[name]
    flat = W.reshape(-1)
    w = flat[j]
    cands = (np.float32(np.float64(w) + dw), w, np.float32(np.float64(w) - dw))
    losses = []
    for v in cands:
        flat[j] = v
        losses.append(float(logit_cross_entropy(model(x).astype(np.float64), y, agg="sum")))
    best = min(losses)
    k = 1 if losses[1] == best else (0 if losses[0] == best else 2)
    flat[j] = cands[k]
    return k
