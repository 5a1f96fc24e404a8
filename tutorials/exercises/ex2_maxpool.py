"""Exercise 2: max pooling with strided slices.

    python -m rso_np.check maxpool tutorials/exercises/ex2_maxpool.py

x (N, C, H, W) float32; windows KH x KW = kernel_size x kernel_size; stride defaults to kernel_size;
OH = (H - kernel_size) // stride + 1 (no padding, partial windows are dropped).
"""

import numpy as np


def max_pool2d(x, kernel_size=2, stride=None):
    """Return (N, C, OH, OW): the maximum of every window."""
    stride = kernel_size if stride is None else stride
    N, C, H, W = x.shape
    ############################################################################
    # TODO: compute OH and OW; start from the slice of offset (0, 0) and take  #
    # np.maximum with the slice of every other offset (i, j):                  #
    #     x[:, :, i:i+stride*OH:stride, j:j+stride*OW:stride]                  #
    ############################################################################
    raise NotImplementedError
    ############################################################################
    #                             END OF YOUR CODE                             #
    ############################################################################
