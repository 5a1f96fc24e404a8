"""Exercise 4: one step of RSO (Algorithm 1, line 10) for one weight.

    python -m rso_np.check rso_step tutorials/exercises/ex4_rso_step.py

model: an rso_np Sequential; name: a parameter name such as "conv2.weight"; j: the index of one weight
in that array, flattened; (x, y): the minibatch; dw: the perturbation already drawn.

Try W[j] + dw, W[j] and W[j] - dw on the SAME minibatch, with the loss summed over it (the paper's F):
    from rso_np.losses import logit_cross_entropy
    F = float(logit_cross_entropy(model(x).astype(np.float64), y, agg="sum"))
Keep the candidate with the smallest loss; on a tie keep the current weight (and prefer +dw over -dw).
Leave W[j] at the chosen value, bit-exactly the old one when "keep" wins, and return 0 (+dw), 1 (keep)
or 2 (-dw). Candidates are float32: np.float32(np.float64(w) + dw).
"""

import numpy as np

from rso_np.losses import logit_cross_entropy


def rso_step(model, name, j, x, y, dw):
    W = model.parameters()[name]
    flat = W.reshape(-1)        # a view: writing flat[j] changes the model's weight
    ############################################################################
    # TODO: build the three float32 candidates, evaluate F for each by setting #
    # flat[j], choose (ties keep), set flat[j] to the winner, return 0/1/2.    #
    ############################################################################
    raise NotImplementedError
    ############################################################################
    #                             END OF YOUR CODE                             #
    ############################################################################
