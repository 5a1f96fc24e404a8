"""Solution to exercise 5 (for teachers)."""

import numpy as np

from rso_np.layers import BatchNorm2d


def batch_stats(x):
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    var = x.var(axis=(0, 2, 3), dtype=np.float64)          # biased: divides by N * H * W
    return mean.astype(np.float32), var.astype(np.float32)


def batch_norm2d(x, gamma, beta, mean=None, var=None, eps=1e-3):
    if mean is None:
        mean, var = batch_stats(x)
    inv_std = 1.0 / np.sqrt(var + eps)
    out = (x - mean[:, None, None]) * inv_std[:, None, None] * gamma[:, None, None] + beta[:, None, None]
    return out.astype(np.float32)


def stored_input(layers, x_ref, x):
    h_ref, h = x_ref, x
    for layer in layers:
        if isinstance(layer, BatchNorm2d):
            mean, var = batch_stats(h_ref)              # the reference batch's statistics, frozen
            g, b = layer.params["weight"], layer.params["bias"]
            h_ref = batch_norm2d(h_ref, g, b, mean, var, layer.eps)
            h = batch_norm2d(h, g, b, mean, var, layer.eps)
        else:
            h_ref, h = layer.forward(h_ref), layer.forward(h)
    return h
