"""Exercise 1: convolution as im2col + one matrix product.

Fill in the two TODO blocks, then check your work:

    python -m rso_np.check conv tutorials/exercises/ex1_conv.py

Shapes (NCHW, float32): x (N, C, H, W); W (C_out, C, KH, KW); b (C_out,).
OH = (H + 2*padding - KH) // stride + 1, and the same for OW.
Reference: rso_np/functional.py (read it after you tried!).
"""

import numpy as np


def im2col(x, KH, KW, stride=1, padding=0):
    """Return col of shape (N*OH*OW, KH*KW*C): row (n, oh, ow) holds the patch that output pixel
    (oh, ow) of image n sees, flattened in (kh, kw, c) order (channel fastest)."""
    N, C, H, W = x.shape
    OH = (H + 2 * padding - KH) // stride + 1
    OW = (W + 2 * padding - KW) // stride + 1
    ############################################################################
    # TODO: pad x with zeros (np.pad), then for every kernel offset (i, j)    #
    # copy the strided slice xpad[:, :, i:i+stride*OH:stride, j:j+stride*OW:stride]
    # into a (N, OH, OW, KH, KW, C) array; reshape it to (N*OH*OW, KH*KW*C).  #
    # Keep float32: create arrays with dtype=x.dtype.                         #
    ############################################################################
    raise NotImplementedError
    ############################################################################
    #                             END OF YOUR CODE                             #
    ############################################################################


def conv2d(x, W, b=None, stride=1, padding=0):
    """Return the (N, C_out, OH, OW) cross-correlation of x with W (plus b)."""
    N, C, H, Wd = x.shape
    C_out, _, KH, KW = W.shape
    ############################################################################
    # TODO: col = im2col(...); reorder W to (C_out, KH, KW, C) so that its     #
    # rows match col's (kh, kw, c) order; one matrix product; add b; reshape   #
    # (N, OH, OW, C_out) and transpose to (N, C_out, OH, OW).                 #
    ############################################################################
    raise NotImplementedError
    ############################################################################
    #                             END OF YOUR CODE                             #
    ############################################################################
