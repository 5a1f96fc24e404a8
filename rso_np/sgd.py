"""Minibatch SGD with momentum through the hand-written backward passes: the baseline RSO is compared with.

    v <- momentum * v - lr_t * (dL/dW + weight_decay * W)
    W <- W + v

lr_t is ``lr`` throughout ("constant") or falls linearly from ``lr`` to 0 over all the steps of the run
("linear", the default).
"""

from dataclasses import asdict, dataclass

import numpy as np

from .backend import get_array_module
from .losses import logit_cross_entropy, logit_cross_entropy_backward


@dataclass
class SGDConfig:
    """lr 0.02 decayed linearly, momentum 0.9, weight decay 1e-4, minibatch 128: common choices for
    small MNIST CNNs."""

    batch_size: int = 128
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "linear"

    def validate(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.lr_schedule not in ("linear", "constant"):
            raise ValueError(f"lr_schedule must be 'linear' or 'constant', got {self.lr_schedule!r}")
        return self

    def to_dict(self):
        return asdict(self)


class SGD:
    """SGD with momentum over ``model``'s parameters on the training set (x, y) on the model's backend.

    ``rng`` (host ``numpy.random.Generator``) shuffles the training set each epoch; ``epochs`` is the
    length of the run, for the learning-rate schedule. ``progress(done, total, "epoch")`` is called
    after each step.
    """

    def __init__(self, model, x, y, config=None, rng=None, epochs=1, progress=None):
        self.model, self.x, self.y = model, x, y
        self.config = (config or SGDConfig()).validate()
        if self.config.batch_size > x.shape[0]:
            raise ValueError(f"batch_size {self.config.batch_size} is larger than the training set "
                             f"({x.shape[0]} examples)")
        model.check_input(x[:1])
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.progress = progress
        self.xp = get_array_module(x)
        self.velocity = {k: self.xp.zeros_like(v) for k, v in model.parameters().items()}
        self.epochs = int(epochs)

    def lr_at(self, step):
        """Learning rate of global step ``step`` (0-based)."""
        if self.config.lr_schedule == "constant":
            return self.config.lr
        return self.config.lr * (1.0 - step / (self.epochs * self.steps_per_epoch()))

    def steps_per_epoch(self):
        return -(-self.x.shape[0] // self.config.batch_size)

    def step(self, xb, yb, lr=None):
        """One update on one minibatch; returns its mean loss (a Python float)."""
        cfg = self.config
        lr = cfg.lr if lr is None else lr
        self.model.train()
        logits = self.model.forward(xb, check=False)
        loss = logit_cross_entropy(logits, yb, "mean", check=False)
        self.model.backward(logit_cross_entropy_backward(logits, yb, "mean"))
        grads = self.model.gradients()
        for name, w in self.model.parameters().items():
            g = grads[name]
            if cfg.weight_decay:
                g = g + cfg.weight_decay * w
            v = self.velocity[name]
            v *= cfg.momentum
            v -= lr * g
            w += v                      # in place: the layers hold these arrays
        return float(loss)

    def run_epoch(self, epoch=1):
        """Epoch ``epoch`` (1-based): one pass over the shuffled training set. Returns its mean loss."""
        order = self.rng.permutation(self.x.shape[0])
        B = self.config.batch_size
        total, losses = self.steps_per_epoch(), []
        for s in range(total):
            idx = self.xp.asarray(order[s * B:(s + 1) * B])
            lr = self.lr_at((epoch - 1) * total + s)
            losses.append(self.step(self.x[idx], self.y[idx], lr))
            if self.progress is not None:
                self.progress(s + 1, total, "epoch")
        return float(np.mean(losses))
