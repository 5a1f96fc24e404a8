"""Solution to exercise 2 (for teachers)."""

import numpy as np


def max_pool2d(x, kernel_size=2, stride=None):
    stride = kernel_size if stride is None else stride
    N, C, H, W = x.shape
    OH = (H - kernel_size) // stride + 1
    OW = (W - kernel_size) // stride + 1
    out = x[:, :, 0:stride * OH:stride, 0:stride * OW:stride].copy()
    for i in range(kernel_size):
        for j in range(kernel_size):
            out = np.maximum(out, x[:, :, i:i + stride * OH:stride, j:j + stride * OW:stride])
    return out
