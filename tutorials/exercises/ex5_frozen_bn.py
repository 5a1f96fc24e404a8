"""Exercise 5: the searched layer's input, with batch-norm statistics frozen before it (the authors' RSO).

    python -m rso_np.check frozen_bn tutorials/exercises/ex5_frozen_bn.py

Tutorial 9 tells the story. Before each layer pass the authors' code sets every batch norm's statistics
from one reference batch (the first 2000 training images) and keeps them fixed in the layers before the
searched one. Then the searched layer's input for an image no longer depends on the other images of its
minibatch: it can be computed once per pass for the whole training set and stored, and every trial runs
the network from the searched layer on (model.forward(stored[chunk], start=k)).

1. batch_stats(x): x (N, C, H, W) float32. Return (mean, var), each (C,) float32: the mean and the
   BIASED variance (divide by the count, not the count - 1) of each channel over N, H and W.
2. batch_norm2d(x, gamma, beta, mean=None, var=None, eps=1e-3): normalise each channel,
   (x - mean) / sqrt(var + eps) * gamma + beta, with the given mean and var; when they are None, with
   the batch's own (batch_stats(x)). gamma, beta, mean, var have shape (C,). Return float32.
3. stored_input(layers, x_ref, x): layers are the rso_np layers before the searched one
   (model.layers[:k]); x_ref is the reference batch, x the images whose input you store. Run x_ref and x
   through the layers side by side. At a batch norm (isinstance(layer, BatchNorm2d); gamma is
   layer.params["weight"], beta layer.params["bias"], its epsilon layer.eps) normalise BOTH with the
   statistics of the reference batch at that point; any other layer: h = layer.forward(h).
   Return what x has become (the searched layer's input).
"""

import numpy as np

from rso_np.layers import BatchNorm2d


def batch_stats(x):
    ############################################################################
    # TODO: per-channel mean and biased variance over axes (0, 2, 3), float32. #
    ############################################################################
    raise NotImplementedError
    ############################################################################
    #                             END OF YOUR CODE                             #
    ############################################################################


def batch_norm2d(x, gamma, beta, mean=None, var=None, eps=1e-3):
    ############################################################################
    # TODO: the batch's statistics when mean is None; broadcast the (C,)       #
    # vectors over (N, C, H, W) with v[:, None, None]; return float32.        #
    ############################################################################
    raise NotImplementedError
    ############################################################################
    #                             END OF YOUR CODE                             #
    ############################################################################


def stored_input(layers, x_ref, x):
    h_ref, h = x_ref, x
    ############################################################################
    # TODO: for each layer: a BatchNorm2d normalises h_ref and h with the      #
    # statistics of h_ref; any other layer is layer.forward(...) on both.      #
    ############################################################################
    raise NotImplementedError
    ############################################################################
    #                             END OF YOUR CODE                             #
    ############################################################################
    return h
