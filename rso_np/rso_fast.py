"""RSO with exact shortcuts: the same decisions as ``rso.RSO`` for the same random draws, far less work.

The literal engine pays three full forward passes of a minibatch for every weight. This one uses facts
about the network that change no decision (see the paper notes, "Cost, and where the speed comes from"):

1. Prefix cache. While layer d is searched, the layers before it do not change, so their output (the
   input of layer d) is computed once per layer pass for every image the pass's minibatches use, and
   gathered per trial. Skipped (computed per trial, once instead of three times) when it would exceed
   ``cache_bytes`` or when a batch norm precedes layer d: in the search, batch norm uses the statistics
   of the minibatch, so an image's activation depends on which other images share its minibatch.
2. Channel delta. W[o, c, ki, kj] += d changes only output channel o of a convolution, by d times one
   shifted slice of input channel c. ReLU, pooling and batch norm act per channel, so the change stays
   in channel o up to the next convolution (or dense layer), which then needs only its input channel o
   for the candidates: ``y + conv(delta_o, W_next[:, o:o+1])``.
3. Dense shortcut. For the last (dense) layer, W[i, j] += d changes only logit i, by d * h[:, j]; the
   three losses follow without a forward pass.
4. Batched candidates. W + dW and W - dW go through the remaining layers as one batch of 2B (batch norm
   keeping the statistics of each candidate's own B images).
5. Decisions stay on the device: all draws of a layer are made up front on the host (the same calls, in
   the same order, as the literal engine), the candidates, the choice and the weight update are device
   operations, so a GPU run does not wait for the host on every trial.

The three candidate values are rounded to float32 exactly as in ``rso.candidates``; the channel delta is
their float32 difference from the current weight. Results agree with the literal engine up to float
rounding, so only near-ties can be decided differently.
"""

import numpy as np

from . import functional as F
from .backend import get_array_module
from .layers import AvgPool2d, BatchNorm2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, MaxPool2d, ReLU
from .losses import per_sample_cross_entropy
from .rso import KEEP, MINUS, PLUS, RSO

PER_CHANNEL = (ReLU, MaxPool2d, AvgPool2d, BatchNorm2d, GlobalAvgPool2d, Flatten)
MIXING = (Conv2d, Dense)


def _bn_groups(x, gamma, beta, eps, groups):
    """Batch norm in search mode, with each of ``groups`` consecutive blocks of the batch normalised by
    its own statistics (one block per candidate)."""
    B = x.shape[0] // groups
    return get_array_module(x).concatenate([F.batch_norm2d(x[k * B:(k + 1) * B], gamma, beta, eps=eps)[0]
                                            for k in range(groups)])


def forward_grouped(layers, x, groups=1):
    """Run ``layers`` on a batch made of ``groups`` minibatches stacked along N."""
    for layer in layers:
        if isinstance(layer, BatchNorm2d) and groups > 1:
            x = _bn_groups(x, layer.params["weight"], layer.params["bias"], layer.eps, groups)
        else:
            x = layer.forward(x)
    return x


def forward_channel(layers, x, o, groups):
    """Run per-channel ``layers`` on channel ``o`` alone: x (G*B, 1, H, W) -> (G*B, 1, H', W') or (G*B, 1)."""
    for layer in layers:
        if isinstance(layer, BatchNorm2d):
            x = _bn_groups(x, layer.params["weight"][o:o + 1], layer.params["bias"][o:o + 1], layer.eps, groups)
        elif isinstance(layer, Flatten):
            x = x.reshape(x.shape[0], -1)
        else:
            x = layer.forward(x)
    return x


def group_losses(logits, y, groups, agg):
    """F for each of ``groups`` stacked minibatches: (groups,) float64, as the literal engine computes it."""
    xp = get_array_module(logits)
    per = per_sample_cross_entropy(logits.astype(xp.float64), xp.tile(y, groups)).reshape(groups, -1)
    return per.sum(axis=1) if agg == "sum" else per.mean(axis=1)


def choose_device(f):
    """``rso.choose`` on a device array f = (F(W + dW), F(W), F(W - dW)): a tie keeps W, + beats -."""
    xp = get_array_module(f)
    best = f.min()
    return xp.where(f[KEEP] == best, KEEP, xp.where(f[PLUS] == best, PLUS, MINUS))


class FastRSO(RSO):
    """Drop-in replacement for ``rso.RSO`` (same arguments, same decisions); ``trial_hook`` is not called.

    ``cache_bytes`` bounds the prefix cache (default 2 GiB).
    """

    def __init__(self, *args, cache_bytes=2 << 30, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache_bytes = int(cache_bytes)
        self.layers = self.model.layers

    # ----------------------------------------------------------------------------------- planning
    def _mixing_after(self, d):
        """Index m of the first conv/dense after layer d if only per-channel layers lie between, else None."""
        for m in range(d + 1, len(self.layers)):
            if isinstance(self.layers[m], MIXING):
                return m
            if not isinstance(self.layers[m], PER_CHANNEL):
                return None
        return len(self.layers)          # nothing mixes channels any more (the output itself)

    def _prefix_getter(self, d, idx_all):
        """A function j -> input of layer d for trial j's minibatch (B, ...), cached where exact."""
        xp, x = self.xp, self.x
        if d == 0:
            return lambda rows: x[rows]
        prefix_bn = any(isinstance(l, BatchNorm2d) for l in self.layers[:d])
        if not prefix_bn:
            uniq = np.unique(idx_all)
            probe = self.model.forward(x[:1], check=False, stop=d)
            need = uniq.size * probe.size * probe.dtype.itemsize
            if need <= self.cache_bytes:
                cache = xp.empty((uniq.size,) + probe.shape[1:], dtype=probe.dtype)
                for s in range(0, uniq.size, 1024):
                    rows = xp.asarray(uniq[s:s + 1024])
                    cache[s:s + 1024] = self.model.forward(x[rows], check=False, stop=d)
                where = xp.full(x.shape[0], -1, dtype=xp.int64)
                where[xp.asarray(uniq)] = xp.arange(uniq.size)
                return lambda rows: cache[where[rows]]
        return lambda rows: self.model.forward(x[rows], check=False, stop=d)

    # ----------------------------------------------------------------------------------- one layer
    def search_unit(self, unit, sigma, count=None):
        """``rso.RSO.search_unit`` with the shortcuts: same draws, same choices."""
        cfg, xp = self.config, self.xp
        flat = unit.array.reshape(-1)
        n = flat.size if count is None else min(count, flat.size)
        # every draw of the layer up front, in the literal engine's order: (minibatch, dW) per weight
        idx_all = np.empty((n, cfg.batch_size), dtype=np.int64)
        dws = np.empty(n)
        for j in range(n):
            idx_all[j], dws[j] = self.draw(sigma)
        trial = self._trial_fn(unit, idx_all)
        idx_dev, dws_dev = xp.asarray(idx_all), xp.asarray(dws)
        wd = cfg.weight_decay if unit.decay else 0.0
        picked = xp.empty(n, dtype=xp.int8)
        for j in range(n):
            # the three float32 values, as rso.candidates computes them, on the device
            w0 = (flat[j].astype(xp.float64) * (1.0 - wd)).astype(xp.float32) if wd else flat[j].copy()
            wp = (w0.astype(xp.float64) + dws_dev[j]).astype(xp.float32)
            wm = (w0.astype(xp.float64) - dws_dev[j]).astype(xp.float32)
            flat[j] = w0
            k = choose_device(trial(j, idx_dev[j], w0, wp, wm))
            flat[j] = xp.stack([wp, w0, wm])[k]
            picked[j] = k
            self._tick(unit.name)
        return picked if xp is np else picked.get()

    def _trial_fn(self, unit, idx_all):
        """The function that evaluates (F(W+dW), F(W), F(W-dW)) for one trial of ``unit``."""
        d = unit.layer_index
        layer = self.layers[d]
        get_h = self._prefix_getter(d, idx_all)
        pname = unit.name.rsplit(".", 1)[1]
        if isinstance(layer, Dense) and d == len(self.layers) - 1:
            return self._dense_last(unit, layer, pname, get_h)
        m = self._mixing_after(d)
        if isinstance(layer, (Conv2d, BatchNorm2d)) and m is not None and (
                m == len(self.layers) or isinstance(self.layers[m], (Conv2d, Dense))):
            return self._channel_delta(unit, d, m, pname, get_h)
        return self._generic(unit, d, get_h)

    # ----------------------------------------------------------------------------------- trial kinds
    def _losses(self, logits, rows, groups):
        return group_losses(logits, self.y[rows], groups, self.config.loss_agg)

    def _generic(self, unit, d, get_h):
        """Exact fallback: the three candidates through layers d.. as one batch of 3B."""
        xp, flat = self.xp, unit.array.reshape(-1)
        layers = self.layers[d:]

        def trial(j, rows, w0, wp, wm):
            h = get_h(rows)
            outs = []
            for v in (wp, w0, wm):
                flat[j] = v
                outs.append(forward_grouped(layers, h, 1))
            flat[j] = w0
            return self._losses(xp.concatenate(outs), rows, 3)
        return trial

    def _dense_last(self, unit, layer, pname, get_h):
        """W[i, j] of the output layer moves logit i by d * h[:, j] (bias b[i]: by d)."""
        xp = self.xp
        shape = unit.array.shape

        def trial(j, rows, w0, wp, wm):
            h = get_h(rows)
            logits = layer.forward(h)                     # with W[j] = w0
            if pname == "weight":
                i, col = divmod(j, shape[1])
                hj = h[:, col]
            else:
                i, hj = j, xp.ones(h.shape[0], dtype=h.dtype)
            cand = xp.concatenate([logits, logits, logits])
            B = h.shape[0]
            dp, dm = wp - w0, wm - w0                     # float32 differences, as in the weights
            cand[:B, i] += dp * hj
            cand[2 * B:, i] += dm * hj
            return self._losses(cand, rows, 3)
        return trial

    def _channel_delta(self, unit, d, m, pname, get_h):
        """A conv weight (or batch-norm scale/shift) of output channel o: only channel o moves up to layer m."""
        xp = self.xp
        layers = self.layers
        layer = layers[d]
        between = layers[d + 1:m]
        mix = layers[m] if m < len(layers) else None
        after = layers[m + 1:]
        shape = unit.array.shape
        is_conv_w = isinstance(layer, Conv2d) and pname == "weight"

        def trial(j, rows, w0, wp, wm):
            h = get_h(rows)
            B = h.shape[0]
            z = layer.forward(h)                           # layer d with W[j] = w0: (B, C, OH, OW)
            if is_conv_w:
                o, c, ki, kj = np.unravel_index(j, shape)
                s, p = layer.stride, layer.padding
                OH, OW = z.shape[2:]
                hc = h[:, c]
                if p:
                    hc = xp.pad(hc, ((0, 0), (p, p), (p, p)))
                piece = hc[:, ki:ki + s * OH:s, kj:kj + s * OW:s]
            elif isinstance(layer, Conv2d):                # conv bias b[o]
                o, piece = j, xp.ones(z.shape[:1] + z.shape[2:], dtype=z.dtype)
            elif pname == "weight":                        # batch-norm scale gamma[o]: moves xhat[:, o]
                o, piece = j, layer._cache[0][:, j]
            else:                                          # batch-norm shift beta[o]
                o, piece = j, xp.ones(z.shape[:1] + z.shape[2:], dtype=z.dtype)
            # the unperturbed network up to the next mixing layer
            a = forward_grouped(between, z, 1)
            y = mix.forward(a) if mix is not None else a
            # channel o of W + dW, W and W - dW through the per-channel layers, all three by one route so
            # that their differences are exact: a change that vanishes (ReLU) gives a zero difference
            zo = z[:, o]
            zc = xp.concatenate([zo + (wp - w0) * piece, zo, zo + (wm - w0) * piece])[:, None]
            ac = forward_channel(between, zc, o, 3)
            if a.ndim == 4:                                # still images: channel o is a[:, o]
                cols = slice(o, o + 1)
            else:                                          # flattened or pooled to (B, C*H*W): its block
                ac = ac.reshape(3 * B, -1)
                cols = slice(o * ac.shape[1], (o + 1) * ac.shape[1])
            base = ac[B:2 * B]
            da = xp.concatenate([ac[:B] - base, ac[2 * B:] - base])
            if mix is None:
                yc = xp.concatenate([a, a, a])
                yc[:B, cols] += da[:B]
                yc[2 * B:, cols] += da[B:]
            else:
                if isinstance(mix, Conv2d):
                    dy = F.conv2d(da, mix.params["weight"][:, o:o + 1], None, mix.stride, mix.padding)
                else:                                      # dense after flatten / global pooling
                    dy = da @ mix.params["weight"][:, cols].T
                yc = xp.concatenate([y + dy[:B], y, y + dy[B:]])
            # W + dW, W and W - dW through the remaining layers as one batch of 3B
            f = self._losses(forward_grouped(after, yc, 3), rows, 3)
            # a candidate whose change vanished before the next mixing layer (a channel that ReLU zeroes,
            # say) leaves the network's output as it is: its loss is F(W) exactly, a tie, as in the literal
            # engine (rows of one batch may be rounded differently, so this is not left to the arithmetic)
            moved = xp.stack([xp.any(da[:B] != 0), xp.asarray(True), xp.any(da[B:] != 0)])
            return xp.where(moved, f, f[KEEP])
        return trial
