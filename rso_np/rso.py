"""RSO, Algorithm 1 of Tripathi & Singh (2020), written literally.

    Input: data X, labels L, rounds C, weights W = {W_1 .. W_D}
    1  X <- (X - mean(X)) / std(X)
    2  initialise each w_j in w_id from N(0, sqrt(2 / |w_id|))
    3  for d = 1..D: sigma_d <- std(W_d)
    4  for c = 1..C:
    5    for d = D down to 1:
    6      for w_id in W_d:
    7        for w_j in w_id:
    8          draw a minibatch (x, l) from (X, L)
    9          dW_j ~ N(0, sigma_d), zero except at w_j
    10         W <- argmin( F(x, l, W + dW_j), F(x, l, W), F(x, l, W - dW_j) )

Line 1 is done by ``rso_np.data`` and line 2 by the model builders (``layers.he_normal``). This module
does lines 3-10, one weight at a time, three full forward passes per weight: the readable reference.
The fast engine must make exactly the decisions this one makes for the same random draws.

Every random decision comes from one host-side ``numpy.random.Generator``, in a fixed order (for each
weight: the minibatch indices, then dW), so a CPU and a GPU run with the same seed draw the same
numbers.
"""

from dataclasses import asdict, dataclass

import numpy as np

from .fast_kernels import parallel_cpu
from .backend import get_array_module, to_numpy
from .layers import BatchNorm2d
from .losses import logit_cross_entropy

SIGMA_SCHEDULES = ("linear", "constant")
LAYER_ORDERS = ("last-to-first", "first-to-last")
PLUS, KEEP, MINUS = 0, 1, 2          # index of the chosen candidate in (W + dW, W, W - dW)


@dataclass
class RSOConfig:
    """Options of the search; where a default comes from is said beside it.

    batch_size: minibatch drawn anew for every weight. Paper and authors' code: 5000. The default
        here, 1024, is for a laptop CPU.
    sigma_schedule: "linear" (the paper: sigma_d falls linearly so that in the last round it is
        sigma_d / 10) or "constant".
    weight_decay: w <- w * (1 - weight_decay) just before the weight's trial (authors' code: 1e-4;
        0 switches it off). Applied to convolution and dense weights, not to batch-norm parameters.
    search_batch_norm: also search batch-norm scale and shift (authors' code: yes), with the fixed
        sigma ``bn_sigma`` (authors' code: 0.167).
    layer_order: "last-to-first" (the paper: the layer closest to the labels first) or
        "first-to-last" (the ablation).
    loss_agg: "sum" (the paper's F: the loss summed over the minibatch, in float64) or "mean".
    """

    batch_size: int = 1024
    sigma_schedule: str = "linear"
    weight_decay: float = 0.0
    search_batch_norm: bool = True
    bn_sigma: float = 0.167
    layer_order: str = "last-to-first"
    loss_agg: str = "sum"

    def validate(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(f"sigma_schedule must be one of {SIGMA_SCHEDULES}, got {self.sigma_schedule!r}")
        if self.layer_order not in LAYER_ORDERS:
            raise ValueError(f"layer_order must be one of {LAYER_ORDERS}, got {self.layer_order!r}")
        if self.loss_agg not in ("sum", "mean"):
            raise ValueError(f"loss_agg must be 'sum' or 'mean', got {self.loss_agg!r}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight_decay must lie in [0, 1), got {self.weight_decay}")
        if self.bn_sigma <= 0:
            raise ValueError(f"bn_sigma must be positive, got {self.bn_sigma}")
        return self

    def to_dict(self):
        return asdict(self)


@dataclass
class SearchUnit:
    """One array that RSO searches: a layer's weight (or a batch norm's scale or shift)."""

    name: str            # parameter name, e.g. "conv3.weight"
    layer_index: int     # position of the layer in the Sequential
    array: object        # the parameter array itself (changed in place)
    sigma: float         # sigma_d: std of the layer's weights after initialisation
    decay: bool          # whether weight decay applies


def search_units(model, config, sigmas=None):
    """The arrays RSO searches, in search order (line 5: d = D down to 1 for "last-to-first").

    ``sigmas`` (name -> float) gives sigma_d from a saved run; otherwise sigma_d is computed from the
    current weights (line 3), which must then be the freshly initialised ones.
    """
    units = []
    for li, (lname, layer) in enumerate(model.named_layers()):
        is_bn = isinstance(layer, BatchNorm2d)
        if is_bn and not config.search_batch_norm:
            continue
        for pname, arr in layer.params.items():
            name = f"{lname}.{pname}"
            if sigmas is not None and name in sigmas:
                sigma = float(sigmas[name])
            elif is_bn:
                sigma = config.bn_sigma
            else:
                sigma = float(to_numpy(arr).astype(np.float64).std())   # line 3: sigma_d <- std(W_d)
            units.append(SearchUnit(name, li, arr, sigma, decay=not is_bn))
    if config.layer_order == "last-to-first":
        # line 5, "for d = D down to 1": layers from the one closest to the labels; inside a layer the
        # parameters keep their own order (a batch norm's scale before its shift).
        order = sorted(range(len(units)), key=lambda i: (-units[i].layer_index, i))
        units = [units[i] for i in order]
    return units


def sigma_at_round(sigma, c, rounds, schedule):
    """sigma_d for round c (1-based) of ``rounds``: constant, or linear from sigma_d to sigma_d / 10."""
    if schedule == "constant" or rounds <= 1:
        return sigma
    return sigma * (1.0 - 0.9 * (c - 1) / (rounds - 1))


def choose(f_plus, f_keep, f_minus):
    """argmin over (F(W + dW), F(W), F(W - dW)) where a tie keeps the current weight (and + beats -)."""
    best = min(f_plus, f_keep, f_minus)
    if f_keep == best:
        return KEEP
    return PLUS if f_plus == best else MINUS


def candidates(w, dw, weight_decay):
    """The three float32 values tried for one weight: (w0 + dW, w0, w0 - dW), w0 = w * (1 - decay).

    Computed on the host in float64 and rounded once to float32, so every engine and backend tries
    bit-identical values.
    """
    w0 = np.float32(np.float64(w) * (1.0 - weight_decay)) if weight_decay else np.float32(w)
    return np.float32(np.float64(w0) + dw), w0, np.float32(np.float64(w0) - dw)


class RSO:
    """The literal RSO search over ``model`` on the training set ``(x, y)``.

    x: (N, C, H, W) float32 and y: (N,) int, on the model's backend (NumPy or CuPy).
    ``rng``: the host-side ``numpy.random.Generator`` behind every random decision.
    ``progress(done, total, unit_name)`` is called after each trial; ``trial_hook(unit, j, idx, losses,
    choice)`` too (idx: the minibatch's indices), for tests and tutorials.
    """

    def __init__(self, model, x, y, config=None, rng=None, rounds=1, sigmas=None, progress=None,
                 trial_hook=None):
        self.model = model
        self.config = (config or RSOConfig()).validate()
        if self.config.batch_size > x.shape[0]:
            raise ValueError(f"batch_size {self.config.batch_size} is larger than the training set "
                             f"({x.shape[0]} examples)")
        model.check_input(x[:1])
        self.x, self.y = x, y
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.rounds = int(rounds)
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        self.units = search_units(model, self.config, sigmas)
        self.progress = progress
        self.trial_hook = trial_hook
        self.xp = get_array_module(x)
        self._done, self._total = 0, self.num_trials()     # progress within a round

    @property
    def sigmas(self):
        return {u.name: u.sigma for u in self.units}

    def num_trials(self):
        return sum(int(u.array.size) for u in self.units)

    def minibatch_loss(self, xb, yb):
        """F(x, l, W): the loss of the current weights on one minibatch, as a Python float."""
        logits = self.model.forward(xb, check=False)
        return float(logit_cross_entropy(logits.astype(self.xp.float64), yb, self.config.loss_agg,
                                         check=False))

    def draw(self, sigma):
        """Lines 8-9: a fresh minibatch (indices, without replacement) and dW ~ N(0, sigma)."""
        idx = self.rng.choice(self.x.shape[0], self.config.batch_size, replace=False)
        dw = self.rng.normal(0.0, sigma)
        return idx, dw

    def run_round(self, c):
        """Round c (1-based) of ``self.rounds``: every searched weight exactly once.

        Returns ``{"counts": {unit name: [n_plus, n_keep, n_minus]}, "choices": {unit name:
        int8 array of PLUS/KEEP/MINUS per weight}}``.
        """
        self.model.train()                      # batch norm: batch statistics during the search
        counts, choices = {}, {}
        self._done, self._total = 0, self.num_trials()
        for unit in self.units:                                 # line 5: d = D down to 1
            sigma = sigma_at_round(unit.sigma, c, self.rounds, self.config.sigma_schedule)
            with parallel_cpu():                                # conv2d on every CPU core (same numbers)
                picked = self.search_unit(unit, sigma)
            choices[unit.name] = picked
            counts[unit.name] = [int((picked == PLUS).sum()), int((picked == KEEP).sum()),
                                 int((picked == MINUS).sum())]
        return {"counts": counts, "choices": choices}

    def _tick(self, name):
        self._done += 1
        if self.progress is not None:
            self.progress(self._done, self._total, name)

    def search_unit(self, unit, sigma, count=None):
        """Lines 6-10 for one searched array: its first ``count`` weights (all by default), in order.

        Returns the choices (int8 PLUS/KEEP/MINUS per weight tried).
        """
        wd = self.config.weight_decay if unit.decay else 0.0
        flat = unit.array.reshape(-1)   # a view: row-major = output channel, input channel, row, column
        n = flat.size if count is None else min(count, flat.size)
        picked = np.empty(n, dtype=np.int8)
        for j in range(n):                                      # lines 6-7: every w_j of every w_id
            idx, dw = self.draw(sigma)                          # lines 8-9
            xi = self.xp.asarray(idx)
            xb, yb = self.x[xi], self.y[xi]
            w_cands = candidates(flat[j], dw, wd)
            losses = []
            for v in w_cands:                                   # line 10: F at W + dW, W, W - dW
                flat[j] = v
                losses.append(self.minibatch_loss(xb, yb))
            k = choose(*losses)                                 # line 10: argmin, a tie keeps W
            flat[j] = w_cands[k]                                # restores W bit-exactly when W wins
            picked[j] = k
            if self.trial_hook is not None:
                self.trial_hook(unit, j, idx, losses, k)
            self._tick(unit.name)
        return picked
