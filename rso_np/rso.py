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

SIGMA_SCHEDULES = ("linear", "authors", "constant")
SIGMA_FROM = ("weights", "he")
LAYER_ORDERS = ("last-to-first", "first-to-last")
BN_STATISTICS = ("minibatch", "frozen-before")
MINIBATCHES = ("draw", "chunks")
PLUS, KEEP, MINUS = 0, 1, 2          # index of the chosen candidate in (W + dW, W, W - dW)


@dataclass
class RSOConfig:
    """Options of the search; where a default comes from is said beside it. The defaults follow the
    paper's pseudocode; ``AUTHORS`` (below) is what the authors' own code does.

    batch_size: the minibatch. Paper and authors' code: 5000 (2000 suggested when memory is short). The
        default here, 1024, is for a laptop CPU.
    minibatches: "draw" (the pseudocode, line 8: a new random minibatch for every weight) or "chunks"
        (authors: the training set is shuffled at the start of each layer pass and the minibatches are
        its consecutive chunks, one per weight, cycled; a batch-norm pass keeps the shuffle of the pass
        before it and restarts its chunks). A pass has N // batch_size chunks of its N training images;
        where batch_size does not divide N, the last N % batch_size images of the shuffle sit the pass out
        (the authors' code requires it to divide).
    bn_statistics: what batch norm normalises with during the search. "minibatch": every batch norm uses
        the statistics of the minibatch in every trial. "frozen-before" (authors): at the start of each
        layer pass every batch norm's statistics are set from one reference batch (the first
        ``bn_reference_images`` training images), and the batch norms before the searched layer keep
        them for the pass; from the searched layer on, batch norm uses the minibatch's statistics.
    bn_reference_images: the reference batch of "frozen-before" (authors: 2000).
    sigma_from: sigma_d of a layer. "weights" (the pseudocode, line 3: the std of the layer's weights at
        initialisation) or "he" (authors: sqrt(2 / fan_in), the std the weights were drawn with).
    sigma_schedule: "linear" (the paper: sigma_d falls linearly so that in the last round it is
        sigma_d / 10), "authors" (round c of C uses sigma_d * (0.1 + 0.9 * (C - c + 1) / C): sigma_d in
        round 1, never quite sigma_d / 10) or "constant".
    weight_decay: w <- w * (1 - weight_decay) just before the weight's trial (authors' code: 1e-4;
        0 switches it off). Applied to convolution and dense weights; to batch-norm scale and shift
        too with ``decay_bn`` (authors: yes).
    search_batch_norm: also search batch-norm scale and shift (authors' code: yes), with the fixed
        sigma ``bn_sigma`` (authors' code: 0.167).
    layer_order: "last-to-first" (the paper: the layer closest to the labels first) or
        "first-to-last" (the ablation).
    bn_after_conv: where a batch norm's scale and shift come in the order. False: as a layer of its own
        (last-to-first: a batch norm before the conv it follows; scale, then shift). True (authors):
        right after the weights of the conv it follows, shift first, then scale.
    loss_agg: "sum" (the paper's F: the loss summed over the minibatch, in float64) or "mean".
    """

    batch_size: int = 1024
    minibatches: str = "draw"
    bn_statistics: str = "minibatch"
    bn_reference_images: int = 2000
    sigma_from: str = "weights"
    sigma_schedule: str = "linear"
    weight_decay: float = 0.0
    decay_bn: bool = False
    search_batch_norm: bool = True
    bn_sigma: float = 0.167
    layer_order: str = "last-to-first"
    bn_after_conv: bool = False
    loss_agg: str = "sum"

    def validate(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        for name, allowed in (("minibatches", MINIBATCHES), ("bn_statistics", BN_STATISTICS),
                              ("sigma_from", SIGMA_FROM), ("sigma_schedule", SIGMA_SCHEDULES),
                              ("layer_order", LAYER_ORDERS), ("loss_agg", ("sum", "mean"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.bn_reference_images < 1:
            raise ValueError(f"bn_reference_images must be at least 1, got {self.bn_reference_images}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight_decay must lie in [0, 1), got {self.weight_decay}")
        if self.bn_sigma <= 0:
            raise ValueError(f"bn_sigma must be positive, got {self.bn_sigma}")
        return self

    def to_dict(self):
        return asdict(self)


# What the authors' MXNet code does, where it differs from the defaults (the paper's pseudocode).
AUTHORS = {"minibatches": "chunks", "bn_statistics": "frozen-before", "bn_reference_images": 2000,
           "sigma_from": "he", "sigma_schedule": "authors", "weight_decay": 1e-4, "decay_bn": True,
           "search_batch_norm": True, "bn_sigma": 0.167, "bn_after_conv": True}


@dataclass
class SearchUnit:
    """One array that RSO searches: a layer's weight (or a batch norm's scale or shift)."""

    name: str            # parameter name, e.g. "conv3.weight"
    layer_index: int     # position of the layer in the Sequential
    array: object        # the parameter array itself (changed in place)
    sigma: float         # sigma_d (see RSOConfig.sigma_from)
    decay: bool          # whether weight decay applies
    batch_norm: bool = False   # a batch norm's scale or shift


def _sigma(layer, arr, is_bn, config):
    """sigma_d of a searched array (line 3, or the authors' choice: see RSOConfig.sigma_from)."""
    if is_bn:
        return config.bn_sigma
    if config.sigma_from == "he":
        W = layer.params["weight"]
        return float(np.sqrt(2.0 / int(np.prod(W.shape[1:]))))         # fan_in of one output
    return float(to_numpy(arr).astype(np.float64).std())                # line 3: sigma_d <- std(W_d)


def search_units(model, config, sigmas=None):
    """The arrays RSO searches, in search order (line 5: d = D down to 1 for "last-to-first").

    ``sigmas`` (name -> float) gives sigma_d from a saved run; otherwise sigma_d comes from
    ``config.sigma_from`` (with "weights", the current weights must be the freshly initialised ones).
    """
    units, owner = [], {}
    conv_before = None
    for li, (lname, layer) in enumerate(model.named_layers()):
        is_bn = isinstance(layer, BatchNorm2d)
        conv_before = li if not is_bn and layer.params else conv_before
        owner[li] = conv_before if is_bn and config.bn_after_conv and conv_before is not None else li
        if is_bn and not config.search_batch_norm:
            continue
        for pname, arr in layer.params.items():
            name = f"{lname}.{pname}"
            sigma = float(sigmas[name]) if sigmas is not None and name in sigmas else \
                _sigma(layer, arr, is_bn, config)
            units.append(SearchUnit(name, li, arr, sigma, decay=not is_bn or config.decay_bn, batch_norm=is_bn))

    def key(i):
        u = units[i]
        o = owner[u.layer_index]
        # with bn_after_conv a batch norm follows its conv's weights, shift ("bias") before scale
        rank = (u.name.endswith(".weight"), i) if u.batch_norm and config.bn_after_conv else (False, i)
        return (-o if config.layer_order == "last-to-first" else o, u.layer_index, rank)
    # line 5, "for d = D down to 1": layers from the one closest to the labels; inside a layer the
    # parameters keep their own order (a batch norm's scale before its shift) unless bn_after_conv.
    return [units[i] for i in sorted(range(len(units)), key=key)]


def sigma_at_round(sigma, c, rounds, schedule):
    """sigma_d for round c (1-based) of ``rounds``: constant; linear from sigma_d to sigma_d / 10
    ("linear", the paper); or sigma_d * (0.1 + 0.9 * (rounds - c + 1) / rounds) ("authors")."""
    if schedule == "authors":
        return sigma * (0.1 + 0.9 * (rounds - c + 1) / rounds)
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
    bit-identical values. ``w``: a float32 scalar, on the host or (a 0-d array) on the device.
    """
    w = float(w)                      # exact for a float32; CuPy refuses an implicit np.float64(array)
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
        if (self.config.bn_statistics == "frozen-before" and model.batch_norms()
                and self.config.bn_reference_images > x.shape[0]):
            raise ValueError(f"bn_reference_images {self.config.bn_reference_images} is larger than the "
                             f"training set ({x.shape[0]} examples): with bn_statistics 'frozen-before' the batch "
                             "norms before the searched layer use the statistics of that many first images")
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
        self._perm, self._perm_state, self._chunk = None, None, 0   # minibatches="chunks": see start_pass

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
        """Lines 8-9: a minibatch (indices) and dW ~ N(0, sigma). The minibatch is a fresh random draw
        without replacement, or with ``minibatches="chunks"`` the next chunk of this pass's shuffle."""
        if self.config.minibatches == "chunks":
            if self._perm is None:
                self._shuffle()
            B = self.config.batch_size
            k = self._chunk % (self.x.shape[0] // B)
            self._chunk += 1
            idx = self._perm[k * B:(k + 1) * B]
        else:
            idx = self.rng.choice(self.x.shape[0], self.config.batch_size, replace=False)
        dw = self.rng.normal(0.0, sigma)
        return idx, dw

    def _shuffle(self, state=None):
        """A new order of the training set for the chunks, drawn from ``self.rng`` (or replayed from the
        generator state ``state`` that it was drawn with, on resume)."""
        gen = self.rng
        if state is not None:
            gen = np.random.Generator(getattr(np.random, state["bit_generator"])())
            gen.bit_generator.state = state
        self._perm_state = gen.bit_generator.state
        self._perm = gen.permutation(self.x.shape[0])
        self._chunk = 0

    def start_pass(self, unit):
        """What happens before the trials of one searched array (a layer pass).

        ``bn_statistics="frozen-before"``: every batch norm's statistics are set from the reference
        batch (the first ``bn_reference_images`` training images, the current weights), and the batch
        norms before the searched layer normalise with them for the whole pass (evaluation mode); from
        the searched layer on batch norm uses the minibatch's own statistics. Otherwise every batch norm
        uses the minibatch's statistics.
        ``minibatches="chunks"``: a new shuffle of the training set, except for a batch-norm pass, which
        keeps the shuffle of the pass before it; the chunks start again from the first.
        """
        cfg = self.config
        if cfg.bn_statistics == "frozen-before":
            self.model.set_reference_stats(self.x[:cfg.bn_reference_images])
            for i, layer in enumerate(self.model.layers):
                layer.training = i >= unit.layer_index
        else:
            self.model.train()
        if cfg.minibatches == "chunks":
            if self._perm is None or not unit.batch_norm:
                self._shuffle()
            self._chunk = 0

    def run_round(self, c, start=0, after_pass=None):
        """Round c (1-based) of ``self.rounds``: every searched weight exactly once. ``start``: the
        number of layer passes of this round already done (a resumed round); ``after_pass(i, unit,
        picked)`` is called after each layer pass i.

        Returns ``{"counts": {unit name: [n_plus, n_keep, n_minus]}, "choices": {unit name:
        int8 array of PLUS/KEEP/MINUS per weight}}`` for the passes it ran.
        """
        counts, choices = {}, {}
        self._done, self._total = sum(int(u.array.size) for u in self.units[:start]), self.num_trials()
        if start == 0:
            self._perm = None
        for i, unit in enumerate(self.units[start:], start):    # line 5: d = D down to 1
            sigma = sigma_at_round(unit.sigma, c, self.rounds, self.config.sigma_schedule)
            self.start_pass(unit)
            with parallel_cpu():                                # conv2d on every CPU core (same numbers)
                picked = self.search_unit(unit, sigma)
            choices[unit.name] = picked
            counts[unit.name] = [int((picked == PLUS).sum()), int((picked == KEEP).sum()),
                                 int((picked == MINUS).sum())]
            if after_pass is not None:
                after_pass(i, unit, picked)
        self.model.train()
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
