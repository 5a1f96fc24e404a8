"""RSO with exact shortcuts: the same decisions as ``rso.RSO`` for the same random draws, far less work.

The literal engine pays three full forward passes of a minibatch for every weight. This one uses facts
about the network that change no decision (see the paper notes, "Cost, and where the speed comes from"):

1. Stored activations. While layer d is searched, the layers before it do not change, so the input of
   layer d is computed once for every training image and gathered per trial. One forward pass over the
   training set stores the input of every searched layer (as many as ``cache_bytes`` allows, deepest
   first); in the paper's order, last layer first, the later passes of the round find theirs stored. An
   entry stays valid while the weights before its layer are those it was computed with. Where the input
   of layer d is not stored, the trial starts from the deepest stored one before it. Nothing after a
   batch norm is stored: in the search, batch norm uses the statistics of the minibatch, so an image's
   activation there depends on which other images share its minibatch (it is computed per trial, on
   the minibatch, as the literal engine does).
2. Channel delta. W[o, c, ki, kj] += d changes only output channel o of a convolution, by d times one
   shifted slice of input channel c. ReLU, pooling and batch norm act per channel, so the change stays
   in channel o up to the next convolution (or dense layer), which then needs only its input channel o
   for the candidates: ``y + conv(delta_o, W_next[:, o:o+1])``.
3. Dense shortcut. For the last (dense) layer, W[i, j] += d changes only logit i, by d * h[:, j]; the
   three losses follow without a forward pass.
4. Batched candidates. W + dW, W and W - dW go through the remaining layers as one batch of 3B (batch
   norm keeping the statistics of each candidate's own B images).
5. Folding. Average pooling is linear, so a convolution followed by it is one convolution: a 2x2 average
   of 3x3 convolutions is a 4x4 convolution of stride 2 (16 multiply-adds per output instead of 36, no
   pooling pass), and a convolution followed by global average pooling is one dense layer.
6. Decisions stay on the device: all draws of a layer are made up front on the host (the same calls, in
   the same order, as the literal engine), the candidates, the choice and the weight update are device
   operations, so a GPU run does not wait for the host on every trial.
7. On the CPU, fewer passes over memory: the minibatch gather, a ReLU before a convolution and the
   candidates' y + dy are done while the convolution copies its input into its buffer (``Staged``,
   ``functional.conv2d_from``), and a layer's trial arrays are kept from one trial to the next
   (``Workspace``). The store pass writes conv + ReLU straight into the stored inputs.

The three candidate values are rounded to float32 exactly as in ``rso.candidates``; the channel delta is
their float32 difference from the current weight. Results agree with the literal engine up to float
rounding, so only near-ties can be decided differently.
"""

import os

import numpy as np

from . import functional as F
from .backend import get_array_module
from .layers import (
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    Dense,
    Flatten,
    GlobalAvgPool2d,
    MaxPool2d,
    ReLU,
)
from .losses import per_sample_cross_entropy
from .rso import KEEP, MINUS, PLUS, RSO

STAGED = True       # on the CPU, gather / add / ReLU while a convolution copies its input (see Staged)
PER_CHANNEL = (ReLU, MaxPool2d, AvgPool2d, BatchNorm2d, GlobalAvgPool2d, Flatten)
MIXING = (Conv2d, Dense)


def _bn_groups(x, gamma, beta, eps, groups):
    """Batch norm in search mode, with each of ``groups`` consecutive blocks of the batch normalised by
    its own statistics (one block per candidate)."""
    B = x.shape[0] // groups
    return get_array_module(x).concatenate([F.batch_norm2d(x[k * B:(k + 1) * B], gamma, beta, eps=eps)[0]
                                            for k in range(groups)])


def _tap_slice(k, stride, padding, out_size, in_size):
    """The input rows (or columns) that kernel tap k sees over all output positions, padding dropped
    (it is zero): rows i*stride + k - padding, i = 0 .. out_size-1, that lie inside the input."""
    i0 = max(0, -((k - padding) // stride))                      # first i with i*stride + k - padding >= 0
    i1 = min(out_size - 1, (in_size - 1 - k + padding) // stride)
    return slice(i0 * stride + k - padding, i1 * stride + k - padding + 1, stride)


class Staged:
    """A batch (N, C, H, W) on the CPU that is never stored whole: ``fill(dst, s, e)`` writes images
    s..e-1, channels-last, into dst. The convolution that reads it (``functional.conv2d_from``) copies
    its input into a small buffer a block of images at a time anyway; a gather, a sum or a ReLU done in
    that copy costs no pass over memory of its own and runs on every core. Same numbers as the array."""

    def __init__(self, fill, shape, dtype):
        self.fill, self.shape, self.dtype = fill, tuple(shape), np.dtype(dtype)

    def array(self, out=None):
        """The batch as an (N, C, H, W) array (channels-last in memory; ``out``: (N, H, W, C) to fill)."""
        N, C, H, W = self.shape
        x = np.empty((N, H, W, C), dtype=self.dtype) if out is None else out
        self.fill(x, 0, N)
        return x.transpose(0, 3, 1, 2)


class Workspace:
    """Arrays kept from one trial to the next, by name (the trials of a layer have the same shapes).

    On the CPU a new large array is paid for again in page faults when it is first written, a good part
    of a trial's time; reusing them avoids it. ``None`` in place of a workspace: fresh arrays."""

    def __init__(self):
        self.arrays = {}

    def get(self, key, shape, dtype, zero=False):
        a = self.arrays.get(key)
        if a is None or a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
            a = self.arrays[key] = (np.zeros if zero else np.empty)(shape, dtype=dtype)
        return a


def _take(ws, key, shape, dtype):
    return None if ws is None else ws.get(key, shape, dtype)


def staged_relu(x):
    """relu(x), applied while a convolution copies x."""
    src = x.transpose(0, 2, 3, 1)
    return Staged(lambda dst, s, e: np.maximum(src[s:e], 0, out=dst), x.shape, x.dtype)


def staged_rows(acts, rows, channel=None, into=None):
    """acts[rows] (acts: a stored activation); with ``channel``, the fill also copies that channel of
    every image into ``into`` (B, H, W), for the channel delta."""
    src = acts.transpose(0, 2, 3, 1)

    def fill(dst, s, e):
        for i, r in enumerate(rows[s:e]):                  # an image at a time: faster than np.take here
            dst[i] = src[r]
        if channel is not None:
            into[s:e] = dst[..., channel]
    return Staged(fill, (len(rows),) + acts.shape[1:], acts.dtype)


def staged_candidates(y, dy, relu):
    """The 3B batch (y + dy[:B], y, y + dy[B:]) of W + dW, W and W - dW, followed by ReLU if ``relu``."""
    B = y.shape[0]
    ys, ds = y.transpose(0, 2, 3, 1), dy.transpose(0, 2, 3, 1)

    def fill(dst, s, e):
        for g in range(s // B, (e - 1) // B + 1):           # the candidates this block of images spans
            a, b = max(s, g * B), min(e, (g + 1) * B)
            out = dst[a - s:b - s]
            if g == 1:
                out[...] = ys[a - B:b - B]
            else:                                            # dy rows: g = 0 -> 0..B-1, g = 2 -> B..2B-1
                np.add(ys[a - g * B:b - g * B], ds[a - g * B + g // 2 * B:b - g * B + g // 2 * B], out=out)
            if relu:
                np.maximum(out, 0, out=out)
    return Staged(fill, (3 * B,) + y.shape[1:], y.dtype)


def _conv(x, W, b, stride, padding, ws=None, key=None, out=None, relu=False):
    """F.conv2d of an array or a Staged batch: into ``out`` (NHWC) or the workspace's array ``key`` if
    given one, followed by ReLU if ``relu``."""
    if get_array_module(W) is not np:
        y = F.conv2d(x.array() if isinstance(x, Staged) else x, W, b, stride, padding)
        if relu:
            y = F.relu(y)
        if out is not None:
            out[...] = y.transpose(0, 2, 3, 1)
            y = out.transpose(0, 3, 1, 2)
        return y
    if not isinstance(x, Staged):
        if ws is None and out is None and not relu:
            return F.conv2d(x, W, b, stride, padding)
        x = Staged(lambda dst, s, e, a=x: F._copy_nhwc(a, s, e, dst), x.shape, x.dtype)
    if out is None:
        OH = F.conv_output_size(x.shape[2], W.shape[2], stride, padding)
        OW = F.conv_output_size(x.shape[3], W.shape[3], stride, padding)
        out = _take(ws, key, (x.shape[0], OH, OW, W.shape[0]), x.dtype)
    return F.conv2d_from(x.fill, x.shape, W, b, stride, padding, x.dtype, out=out, relu=relu)


def conv_global_avg(x, W, b=None, stride=1, padding=0, ws=None, key=None):
    """global_avg_pool2d(conv2d(x, W, b, stride, padding)) without the convolution: (N, C_out).

    Both steps are linear, so together they are one dense layer on the flattened input: input pixel
    (c, h, w) reaches output o through every tap (ki, kj) whose window covers it, with weight
    W[o, c, ki, kj] / (OH*OW). The effective (C*H*W, C_out) matrix costs less than one image's convolution.
    Same numbers up to float rounding.
    """
    if isinstance(x, Staged):
        x = x.array(_take(ws, key, (x.shape[0],) + x.shape[2:] + x.shape[1:2], x.dtype))
    xp = get_array_module(x)
    C_out, _, KH, KW = W.shape
    N, _, H, Wd = x.shape
    OH, OW = F.conv_output_size(H, KH, stride, padding), F.conv_output_size(Wd, KW, stride, padding)
    rows, cols = xp.zeros((H, KH), dtype=W.dtype), xp.zeros((Wd, KW), dtype=W.dtype)
    for k in range(KH):
        rows[_tap_slice(k, stride, padding, OH, H), k] = 1                # rows[h, ki]: tap ki sees row h
    for k in range(KW):
        cols[_tap_slice(k, stride, padding, OW, Wd), k] = 1
    if x.transpose(0, 2, 3, 1).flags.c_contiguous:        # channels-last in memory: flatten as (h, w, c)
        W_eff = xp.einsum("ocij,hi,wj->hwco", W, rows, cols, optimize=xp is np) / (OH * OW)
        x = x.transpose(0, 2, 3, 1)
    else:
        W_eff = xp.einsum("ocij,hi,wj->chwo", W, rows, cols, optimize=xp is np) / (OH * OW)
    out = x.reshape(N, -1) @ W_eff.reshape(-1, C_out)
    return out + b if b is not None else out


def conv_avg_pool(x, W, b=None, padding=0, pool=2, pool_stride=None, ws=None, key=None, out=None, relu=False):
    """avg_pool2d(conv2d(x, W, b, 1, padding), pool, pool_stride) as one strided convolution.

    Both steps are linear: output (i, j) averages the convolution at rows i*ps + a, columns j*ps + c
    (a, c < pool), so it is one convolution of stride ps with the (KH + pool - 1) x (KW + pool - 1) kernel
    W' = sum over (a, c) of W shifted by (a, c), / pool^2. For a 3x3 kernel and 2x2 pooling that is 16
    taps per pooled output instead of 4 x 9, and no pooling pass. Same numbers up to float rounding.
    """
    xp = get_array_module(W)
    ps = pool if pool_stride is None else pool_stride
    C_out, C_in, KH, KW = W.shape
    W2 = xp.zeros((C_out, C_in, KH + pool - 1, KW + pool - 1), dtype=W.dtype)
    for a in range(pool):
        for c in range(pool):
            W2[:, :, a:a + KH, c:c + KW] += W
    return _conv(x, W2 * W.dtype.type(1.0 / (pool * pool)), b, ps, padding, ws, key, out, relu)


def _folded_pool(layers, i):
    """The linear pooling right after conv layers[i] that ``conv_block`` folds into it, or None."""
    if not isinstance(layers[i], Conv2d) or i + 1 >= len(layers):
        return None
    nxt = layers[i + 1]
    if isinstance(nxt, GlobalAvgPool2d) or (isinstance(nxt, AvgPool2d) and layers[i].stride == 1):
        return nxt
    return None


def block_size(layers, i):
    """How many layers ``conv_block(layers, i, ...)`` covers: 2 with a folded pooling, else 1."""
    return 1 if _folded_pool(layers, i) is None else 2


def conv_block(layers, i, x, in_channels=None, ws=None, out=None, relu=False):
    """Conv layers[i] with the average pooling right after it folded in (``conv_global_avg``,
    ``conv_avg_pool``) applied to x (an array, or a ``Staged`` batch on the CPU). ``in_channels``: only
    that slice of the input channels (no bias), for a change that lives in those channels. ``ws``: a
    ``Workspace`` to take the output from; ``out``: an (N, OH, OW, C_out) array to write it into and
    ``relu``: ReLU applied to it (with ``out`` and ``relu``: not for global average pooling)."""
    conv, pool = layers[i], _folded_pool(layers, i)
    key = (id(conv), in_channels is not None)
    W, b = conv.params["weight"], conv.params.get("bias")
    if in_channels is not None:
        W, b = W[:, in_channels], None
    if isinstance(pool, GlobalAvgPool2d):
        if out is not None or relu:
            raise ValueError("conv_block: out= and relu= are not for a conv folded with global pooling")
        return conv_global_avg(x, W, b, conv.stride, conv.padding, ws, key)
    if isinstance(pool, AvgPool2d):
        return conv_avg_pool(x, W, b, conv.padding, pool.kernel_size, pool.stride, ws, key, out, relu)
    return _conv(x, W, b, conv.stride, conv.padding, ws, key, out, relu)


def forward_grouped(layers, x, groups=1, ws=None):
    """Run ``layers`` on a batch made of ``groups`` minibatches stacked along N (batch norm keeps each
    minibatch's own statistics); a conv and the average pooling after it run as one ``conv_block``, and
    on the CPU a ReLU right before a conv is applied as the conv copies its input (``staged_relu``)."""
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(x, Staged) and not isinstance(layer, Conv2d):
            x = x.array()
        if (isinstance(layer, ReLU) and i + 1 < len(layers) and isinstance(layers[i + 1], Conv2d)
                and STAGED and not isinstance(x, Staged) and get_array_module(x) is np):
            x = conv_block(layers, i + 1, staged_relu(x), ws=ws)
            i += 1 + block_size(layers, i + 1)
            continue
        if isinstance(layer, Conv2d):
            x = conv_block(layers, i, x, ws=ws)
            i += block_size(layers, i)
            continue
        if isinstance(layer, BatchNorm2d) and groups > 1:
            x = _bn_groups(x, layer.params["weight"], layer.params["bias"], layer.eps, groups)
        else:
            x = layer.forward(x)
        i += 1
    return x.array() if isinstance(x, Staged) else x


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


def _empty_like_activation(xp, shape, dtype):
    """An empty (N, C, H, W) array stored channels-last in memory, the order in which conv2d reads its
    input and writes its output (2-d shapes: plain)."""
    if len(shape) != 4:
        return xp.empty(shape, dtype=dtype)
    N, C, H, W = shape
    return xp.empty((N, H, W, C), dtype=dtype).transpose(0, 3, 1, 2)


def default_cache_bytes(xp):
    """Room for stored activations: a quarter of the memory the arrays live in (RAM, or the GPU's),
    at most 8 GiB. For paper_mnist() on the 60,000 MNIST images every layer's input takes 4.9 GB; with
    less room the first layers' inputs are recomputed per trial (same results, slower)."""
    if xp is np:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):        # no sysconf (Windows): assume 8 GiB
            total = 8 << 30
    else:
        total = xp.cuda.runtime.memGetInfo()[1]
    return min(8 << 30, total // 4)


class FastRSO(RSO):
    """Drop-in replacement for ``rso.RSO`` (same arguments, same decisions); ``trial_hook`` is not called.

    ``cache_bytes`` bounds the stored activations (default: ``default_cache_bytes``).
    """

    def __init__(self, *args, cache_bytes=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache_bytes = default_cache_bytes(self.xp) if cache_bytes is None else int(cache_bytes)
        self.layers = self.model.layers
        # where activations may be stored: inputs of searched layers with no batch norm before them
        first_bn = next((i for i, l in enumerate(self.layers) if isinstance(l, BatchNorm2d)), len(self.layers))
        self._points = sorted({u.layer_index for u in self.units if 0 < u.layer_index <= first_bn})
        self._store = {}                 # layer index -> (weights before it when computed, its input)

    # ----------------------------------------------------------------------------------- planning
    def _mixing_after(self, d):
        """Index m of the first conv/dense after layer d if only per-channel layers lie between, else None."""
        for m in range(d + 1, len(self.layers)):
            if isinstance(self.layers[m], MIXING):
                return m
            if not isinstance(self.layers[m], PER_CHANNEL):
                return None
        return len(self.layers)          # nothing mixes channels any more (the output itself)

    def _weights_before(self, k):
        return [p for layer in self.layers[:k] for p in layer.params.values()]

    def _drop_stale(self):
        """Forget every stored input whose layer has a weight before it that differs from the snapshot
        taken when the input was computed; returns their arrays (for reuse: memory written once before
        costs no page faults)."""
        dropped = []
        for k, (snapshot, acts) in list(self._store.items()):
            now = self._weights_before(k)
            if len(now) != len(snapshot) or not all(bool(self.xp.array_equal(a, b)) for a, b in zip(now, snapshot)):
                del self._store[k]
                dropped.append(acts)
        return dropped

    def _store_inputs(self, d):
        """Make sure the inputs of layer d (and of the searched layers before it, deepest first, as far as
        ``cache_bytes`` allows) are stored for every training image; returns (k, acts): the deepest stored
        layer k <= d and its input (k = 0: the training images themselves)."""
        xp, x = self.xp, self.x
        spare = self._drop_stale()
        points = [k for k in sorted(self._points, reverse=True) if k <= d]
        k0 = next((k for k in points if k in self._store), 0)
        src = self._store[k0][1] if k0 else x
        want, used = {}, sum(a.nbytes for _, a in self._store.values())
        for k in (k for k in points if k > k0):
            probe = self.model.forward(x[:1], check=False, stop=k)
            need = x.shape[0] * probe.size * probe.dtype.itemsize
            if used + need <= self.cache_bytes:
                shape = (x.shape[0],) + probe.shape[1:]
                same = next((i for i, a in enumerate(spare) if a.shape == shape and a.dtype == probe.dtype), None)
                want[k] = spare.pop(same) if same is not None else _empty_like_activation(xp, shape, probe.dtype)
                used += need
        if want:
            stops = sorted(want)
            ws = Workspace() if xp is np else None
            for s in range(0, x.shape[0], 1024):             # one forward pass, a chunk of images at a time
                a, k = src[s:s + 1024], k0
                for stop in stops:
                    seg, dst = self.layers[k:stop], want[stop][s:s + 1024]
                    c = max((i for i, l in enumerate(seg) if isinstance(l, Conv2d)), default=None)
                    if (c is not None and c + block_size(seg, c) == len(seg) - 1 and isinstance(seg[-1], ReLU)
                            and dst.ndim == 4 and not isinstance(_folded_pool(seg, c), GlobalAvgPool2d)):
                        # a segment that ends conv (+ pooling) + ReLU: the conv writes into the store
                        conv_block(seg, c, forward_grouped(seg[:c], a, ws=ws), out=dst.transpose(0, 2, 3, 1),
                                   relu=True)
                    else:
                        dst[...] = forward_grouped(seg, a, ws=ws)
                    a, k = dst, stop
            for k, acts in want.items():
                self._store[k] = ([p.copy() for p in self._weights_before(k)], acts)
        k = max([k0, *want])
        return k, (self._store[k][1] if k else x)

    def _prefix_getter(self, d):
        """A function rows -> input of layer d for a minibatch (B, ...): gathered from the stored input
        of layer d, or computed on the minibatch from the deepest stored layer before it. Also the stored
        input of layer d itself, or None."""
        k, acts = self._store_inputs(d)
        if k == d:
            return (lambda rows: acts[rows]), acts
        return (lambda rows: forward_grouped(self.layers[k:d], acts[rows])), None

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
        trial = self._trial_fn(unit)
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

    def _trial_fn(self, unit):
        """The function that evaluates (F(W+dW), F(W), F(W-dW)) for one trial of ``unit``."""
        d = unit.layer_index
        layer = self.layers[d]
        get_h, stored = self._prefix_getter(d)
        pname = unit.name.rsplit(".", 1)[1]
        if isinstance(layer, Dense) and d == len(self.layers) - 1:
            return self._dense_last(unit, layer, pname, get_h)
        m = self._mixing_after(d)
        if isinstance(layer, (Conv2d, BatchNorm2d)) and m is not None and (
                m == len(self.layers) or isinstance(self.layers[m], (Conv2d, Dense))):
            return self._channel_delta(unit, d, m, pname, get_h, stored)
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

    def _channel_delta(self, unit, d, m, pname, get_h, stored):
        """A conv weight (or batch-norm scale/shift) of output channel o: only channel o moves up to layer m."""
        xp = self.xp
        layers = self.layers
        layer = layers[d]
        is_conv = isinstance(layer, Conv2d)
        pool = _folded_pool(layers, d)                     # folded into layer d's conv_block, if any
        between = layers[d + block_size(layers, d):m]
        mix = layers[m] if m < len(layers) else None
        after_at = m + (block_size(layers, m) if isinstance(mix, Conv2d) else 1)
        after = layers[after_at:]
        shape = unit.array.shape
        # On the CPU the copies that feed a convolution also gather the minibatch, apply a ReLU or add
        # the candidates' change (``Staged``): where the layers allow it, these arrays are never made.
        cpu = xp is np and STAGED
        ws = Workspace() if cpu else None                  # the trial's arrays, kept between trials
        stage_h = cpu and stored is not None and is_conv and pname == "weight"
        stage_a = cpu and isinstance(mix, Conv2d) and all(isinstance(l, ReLU) for l in between) and len(between) == 1
        first = after_at + 1 if after and isinstance(after[0], ReLU) else after_at
        stage_c = (cpu and isinstance(mix, Conv2d) and first < len(layers) and isinstance(layers[first], Conv2d)
                   and all(isinstance(l, ReLU) for l in layers[after_at:first]))

        def trial(j, rows, w0, wp, wm):
            if is_conv and pname == "weight":
                o, c, ki, kj = np.unravel_index(j, shape)
                s, p = layer.stride, layer.padding
            if stage_h:
                # layer d on the minibatch gathered from the stored input; the copy keeps input channel c
                B, _, H, W = (len(rows),) + stored.shape[1:]
                hc = ws.get("hc", (B, H + 2 * p, W + 2 * p), stored.dtype, zero=True)   # border stays 0
                z = conv_block(layers, d, staged_rows(stored, rows, c, hc[:, p:p + H, p:p + W]), ws=ws)
            else:
                h = get_h(rows)
                B, H, W = h.shape[0], h.shape[2], h.shape[3]
                # layer d with W[j] = w0 (and the pooling folded into it): (B, C, OH, OW)
                z = conv_block(layers, d, h) if is_conv else layer.forward(h)
                if is_conv and pname == "weight":
                    hc = h[:, c]
                    if p:
                        hc = xp.pad(hc, ((0, 0), (p, p), (p, p)))
            if is_conv and pname == "weight":
                OH = F.conv_output_size(H, layer.kernel_size, s, p)
                OW = F.conv_output_size(W, layer.kernel_size, s, p)
                piece = hc[:, ki:ki + s * OH:s, kj:kj + s * OW:s]
                if pool is not None:                       # the folded pooling is linear: pool the piece
                    piece = pool.forward(piece[:, None])[:, 0]     # (B, OH', OW'), or (B,) if global
            elif is_conv:                                  # conv bias b[o]
                o, piece = j, xp.ones(z.shape[:1] + z.shape[2:], dtype=z.dtype)
            elif pname == "weight":                        # batch-norm scale gamma[o]: moves xhat[:, o]
                o, piece = j, layer._cache[0][:, j]
            else:                                          # batch-norm shift beta[o]
                o, piece = j, xp.ones(z.shape[:1] + z.shape[2:], dtype=z.dtype)
            # the unperturbed network up to the next mixing layer
            if stage_a:
                a_ndim, y = 4, conv_block(layers, m, staged_relu(z), ws=ws)
            else:
                a = forward_grouped(between, z, 1)
                a_ndim = a.ndim
                y = a if mix is None else conv_block(layers, m, a) if isinstance(mix, Conv2d) else mix.forward(a)
            # channel o of W + dW, W and W - dW through the per-channel layers, all three by one route so
            # that their differences are exact: a change that vanishes (ReLU) gives a zero difference
            zo = z[:, o]
            zc = xp.concatenate([zo + (wp - w0) * piece, zo, zo + (wm - w0) * piece])[:, None]
            ac = forward_channel(between, zc, o, 3)
            if a_ndim == 4:                                # still images: channel o is a[:, o]
                cols = slice(o, o + 1)
            else:                                          # flattened or pooled to (B, C*H*W): its block
                ac = ac.reshape(3 * B, -1)
                cols = slice(o * ac.shape[1], (o + 1) * ac.shape[1])
            base = ac[B:2 * B]
            da = xp.concatenate([ac[:B] - base, ac[2 * B:] - base])
            # W + dW, W and W - dW through the remaining layers as one batch of 3B
            if mix is None:
                yc = xp.concatenate([a, a, a])
                yc[:B, cols] += da[:B]
                yc[2 * B:, cols] += da[B:]
                out = forward_grouped(after, yc, 3)
            else:
                if isinstance(mix, Conv2d):
                    dy = conv_block(layers, m, da, slice(o, o + 1), ws)
                else:                                      # dense after flatten / global pooling
                    dy = da @ mix.params["weight"][:, cols].T
                if stage_c:                                # y + dy (and ReLU) as the next conv copies it
                    nxt = conv_block(layers, first, staged_candidates(y, dy, first > after_at), ws=ws)
                    out = forward_grouped(layers[first + block_size(layers, first):], nxt, 3, ws)
                else:
                    yc = _empty_like_activation(xp, (3 * B,) + y.shape[1:], y.dtype)
                    xp.add(y, dy[:B], out=yc[:B])
                    yc[B:2 * B] = y
                    xp.add(y, dy[B:], out=yc[2 * B:])
                    out = forward_grouped(after, yc, 3)
            f = self._losses(out, rows, 3)
            # a candidate whose change vanished before the next mixing layer (a channel that ReLU zeroes,
            # say) leaves the network's output as it is: its loss is F(W) exactly, a tie, as in the literal
            # engine (rows of one batch may be rounded differently, so this is not left to the arithmetic)
            moved = xp.stack([xp.any(da[:B] != 0), xp.asarray(True), xp.any(da[B:] != 0)])
            return xp.where(moved, f, f[KEEP])
        return trial
