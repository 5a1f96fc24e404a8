"""RSO with exact shortcuts: the same decisions as ``rso.RSO`` for the same random draws, far less work.

The literal engine pays three full forward passes of a minibatch for every weight. This one uses facts
about the network that change no decision (see the paper notes, "Cost, and where the speed comes from"),
each a named step below:

1. Stored inputs (``FastRSO._store_inputs``). While layer d is searched, the layers before it do not
   change, so the input of layer d is computed once for every training image and gathered per trial.
   One forward pass over the training set stores the input of every searched layer (as many as
   ``cache_bytes`` allows, deepest first); in the paper's order, last layer first, the later passes of
   the round find theirs stored. An entry stays valid while the weights before its layer are those it
   was computed with. Where the input of layer d is not stored, the trial starts from the deepest stored
   one before it. With batch-norm statistics of the minibatch, nothing after a batch norm is stored:
   an image's activation there depends on which other images share its minibatch (it is computed per
   trial, on the minibatch, as the literal engine does). With statistics frozen before the searched
   layer (the authors' search) every searched layer's input is storable, and a batch norm's own input
   is stored for its two passes (``_own_point``).
2. Channel delta (``ChannelDelta``). W[o, c, ki, kj] += d changes only output channel o of a
   convolution, by d times one shifted slice of input channel c. ReLU, pooling and batch norm act per
   channel, so the change stays in channel o up to the next convolution (or dense layer), which then
   needs only its input channel o for the candidates: ``y + conv(delta_o, W_next[:, o:o+1])``.
3. Dense shortcut (``DenseShortcut``). For the last (dense) layer, W[i, j] += d changes only logit i, by
   d * h[:, j]; the three losses follow without a forward pass.
4. Batched candidates (``forward_grouped``, ``Batched``). W + dW, W and W - dW go through the remaining
   layers as one batch of 3B (batch norm keeping the statistics of each candidate's own B images).
5. Folding (``conv_block``). Average pooling is linear, so a convolution followed by it is one
   convolution (``fast_kernels.conv_avg_pool``), and a convolution followed by global average pooling is
   one dense layer (``fast_kernels.conv_global_avg``). Batch norm is affine per channel once its
   statistics are known, so global average pooling after it is batch norm of the pooled channels
   (``fast_kernels.bn_global_avg``), and global max pooling after it is batch norm of each channel's
   maximum, or minimum where its scale is negative (``fast_kernels.bn_global_max``: the map is monotone,
   and so is float rounding).
6. Decisions stay on the device (``FastRSO.search_unit``): all draws of a layer are made up front on the
   host (the same calls, in the same order, as the literal engine), the candidates, the choice and the
   weight update are device operations, so a GPU run does not wait for the host on every trial.
7. Kept channels (``KeptChannels``). With chunked minibatches the same images come back every few
   trials, and the C_in*KH*KW trials of one output channel o of a conv follow one another: per chunk,
   channel o of the conv's output is kept and brought up to date with the changes made since the chunk
   was last seen, and the next mixing layer's output without channel o is kept while o is. A trial then
   convolves neither layer d nor, beyond channel o, layer m (on the CPU).
8. Per-chunk stored inputs (``FastRSO._store_chunks``). With the minibatch's batch-norm statistics
   (nothing after a batch norm is a property of one image, see 1.) but chunked minibatches, a trial's
   minibatch is always one of the pass's chunks, and the layers before d do not change during the pass:
   so the input of layer d is stored for each chunk, computed on that chunk with its own statistics, and
   the trials gather it as in 1. (and 2. and 7. apply as with a stored input).

How the arrays are computed on the CPU (a few images at a time on every core, the minibatch gather, a
ReLU and the candidates' y + dy done while a convolution copies its input, trial arrays kept between
trials) is ``fast_kernels``' business: ``Staged`` batches and ``Workspace`` come from there, and the
choice between a staged and a plain step is made once per layer pass, not inside a trial.

The three candidate values are rounded to float32 exactly as in ``rso.candidates``; the channel delta is
their float32 difference from the current weight. Results agree with the literal engine up to float
rounding, so only near-ties can be decided differently.
"""

import gc
import os

import numpy as np

from . import functional as F
from .backend import get_array_module
from .fast_kernels import (
    Staged,
    Workspace,
    batch_norm,
    bn_global_avg,
    bn_global_max,
    bn_scale_shift,
    candidates_bn_scale_shift,
    channels_last,
    conv2d,
    conv_avg_pool,
    conv_global_avg,
    gather_channels,
    global_max,
    relu,
    staged_bn_relu,
    staged_candidates,
    staged_relu,
    staged_rows,
)
from .layers import AvgPool2d, BatchNorm2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, GlobalMaxPool2d, MaxPool2d, ReLU
from .losses import per_sample_cross_entropy
from .rso import KEEP, MINUS, PLUS, RSO

STAGED = True       # on the CPU, gather / add / ReLU while a convolution copies its input (fast_kernels.Staged)
STAGED_BN = True    # on the CPU, batch norm after the mixing layer from y and dy: the 3B batch never made
KEPT = True         # with chunked minibatches, keep per chunk what one output channel's trials share (7.)
# ... where each chunk comes back at least this many times within one output channel's trials (C_in*KH*KW
# trials, training images / B chunks). Measured on paper_mnist_bn (benchmarks/bench_shortcut.py and
# bench_rso.py): 0.75 times (conv1 at minibatch 5000) was 37% slower than without keeping, 2.4 times (1000)
# 3-5% faster, 4.8 times (2000) 12-20% faster, 12 times (5000) 1.1-2.8x faster.
KEPT_VISITS = 2
PER_CHUNK = True    # with the minibatch's batch-norm statistics and chunks, store the searched layer's input per chunk (8.)
GLOBAL_MAX = True   # on the CPU, global max pooling of a channels-last array as a tree of maxima (fast_kernels.global_max)
BN_GLOBAL_MAX = True  # on the CPU, batch norm then global max pooling from each channel's extremes (5., bn_global_max)
PER_CHANNEL = (ReLU, MaxPool2d, AvgPool2d, BatchNorm2d, GlobalAvgPool2d, GlobalMaxPool2d, Flatten)
MIXING = (Conv2d, Dense)


def mixing_after(layers, d):
    """Index m of the first conv/dense after layer d if only per-channel layers lie between, else None."""
    for m in range(d + 1, len(layers)):
        if isinstance(layers[m], MIXING):
            return m
        if not isinstance(layers[m], PER_CHANNEL):
            return None
    return len(layers)                   # nothing mixes channels any more (the output itself)


def chunks_come_back(trials, images, batch_size):
    """Whether, with chunked minibatches, each of the images // batch_size chunks comes back at least
    ``KEPT_VISITS`` times within one output channel's ``trials`` (C_in*KH*KW): where 7. kept channels pay."""
    return trials >= KEPT_VISITS * (images // batch_size)


def _staging(xp):
    """Whether the CPU staging of ``fast_kernels`` is used for arrays of module xp."""
    return STAGED and xp is np


# --------------------------------------------------------------------------- 5. folding


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


def conv_block(layers, i, x, in_channels=None, ws=None, out=None, relu=False, weight=None, add=None):
    """Conv layers[i] with the average pooling right after it folded in, applied to x (an array, or a
    ``Staged`` batch on the CPU). ``in_channels``: only that slice of the input channels (no bias), for a
    change that lives in those channels. ``weight``: this kernel in place of the layer's (no bias; the
    layer's stride, padding and pooling). ``ws``: a ``Workspace`` to take the output from; ``out``: an
    (N, OH, OW, C_out) array to write it into and ``relu``: ReLU applied to it; ``add``: an array added to
    it (``fast_kernels.conv2d``; ``out``, ``relu`` and ``add``: not for global average pooling)."""
    conv, pool = layers[i], _folded_pool(layers, i)
    key = (id(conv), in_channels is not None, weight is not None)
    W, b = conv.params["weight"], conv.params.get("bias")
    if in_channels is not None:
        W, b = W[:, in_channels], None
    if weight is not None:
        W, b = weight, None
    if isinstance(pool, GlobalAvgPool2d):
        if out is not None or relu or add is not None:
            raise ValueError("conv_block: out=, relu= and add= are not for a conv folded with global pooling")
        return conv_global_avg(x, W, b, conv.stride, conv.padding, ws, key)
    if isinstance(pool, AvgPool2d):
        return conv_avg_pool(x, W, b, conv.padding, pool.kernel_size, pool.stride, ws, key, out, relu, add)
    return conv2d(x, W, b, conv.stride, conv.padding, out, relu, ws, key, add)


# --------------------------------------------------------------------------- 4. batched candidates


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
                and not isinstance(x, Staged) and _staging(get_array_module(x))):
            x = conv_block(layers, i + 1, staged_relu(x), ws=ws)
            i += 1 + block_size(layers, i + 1)
        elif (isinstance(layer, BatchNorm2d) and layer.training and [type(l) for l in layers[i + 1:i + 3]] == [ReLU, Conv2d]
              and not isinstance(x, Staged) and _staging(np) and channels_last(x)):
            # batch norm (each minibatch's statistics) and ReLU applied as the next conv copies its input
            scale, shift = bn_scale_shift(x, layer.params["weight"], layer.params["bias"], layer.eps, groups)
            x = conv_block(layers, i + 2, staged_bn_relu(x, scale, shift), ws=ws)
            i += 2 + block_size(layers, i + 2)
        elif (isinstance(layer, BatchNorm2d) and layer.training and i + 1 < len(layers)
              and isinstance(layers[i + 1], GlobalAvgPool2d) and channels_last(x)):
            # global pooling after batch norm: batch norm of the pooled channels (it is affine per channel)
            x = bn_global_avg(x, layer.params["weight"], layer.params["bias"], layer.eps, groups)
            i += 2
        elif (isinstance(layer, BatchNorm2d) and layer.training and i + 1 < len(layers)
              and isinstance(layers[i + 1], GlobalMaxPool2d) and BN_GLOBAL_MAX and channels_last(x)):
            # global max pooling after batch norm: batch norm of each channel's maximum (or minimum)
            x = bn_global_max(x, layer.params["weight"], layer.params["bias"], layer.eps, groups)
            i += 2
        elif isinstance(layer, GlobalMaxPool2d) and GLOBAL_MAX and channels_last(x):
            x = global_max(x)                          # the same maxima, in a third of the time
            i += 1
        elif isinstance(layer, Conv2d):
            x = conv_block(layers, i, x, ws=ws)
            i += block_size(layers, i)
        elif isinstance(layer, BatchNorm2d) and layer.training:       # each minibatch's own statistics
            x = batch_norm(x, layer.params["weight"], layer.params["bias"], layer.eps, groups, ws,
                           (id(layer), groups, x.shape[1]))
            i += 1
        else:
            x = layer.forward(x)
            i += 1
    return x.array() if isinstance(x, Staged) else x


def forward_channel(layers, x, o, groups, ws=None):
    """Run per-channel ``layers`` on channel ``o`` alone: x (G*B, 1, H, W) -> (G*B, 1, H', W') or (G*B, 1).
    ``ws``: a Workspace (NumPy) for the outputs of batch norm and ReLU."""
    for i, layer in enumerate(layers):
        if isinstance(layer, BatchNorm2d):
            x = batch_norm(x, layer.params["weight"][o:o + 1], layer.params["bias"][o:o + 1], layer.eps, groups,
                           ws, ("channel", i))
        elif isinstance(layer, Flatten):
            x = x.reshape(x.shape[0], -1)
        elif isinstance(layer, ReLU) and ws is not None:
            x = relu(x, ws, ("channel", i))
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


# --------------------------------------------------------------------------- the engine


class FastRSO(RSO):
    """Drop-in replacement for ``rso.RSO`` (same arguments, same decisions); ``trial_hook`` is not called.

    ``cache_bytes`` bounds the stored activations (default: ``default_cache_bytes``).
    """

    def __init__(self, *args, cache_bytes=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache_bytes = default_cache_bytes(self.xp) if cache_bytes is None else int(cache_bytes)
        self.layers = self.model.layers
        self._points = self._storable()
        self._store = {}                 # layer index -> (weights before it when computed, its input)
        self._chunk_acts = None          # 8. the input of the searched layer per chunk (this pass's)

    # ------------------------------------------------------------------- 1. stored inputs
    def _storable(self):
        """The layers whose input may be stored for a pass. With batch-norm statistics of the minibatch,
        the inputs of searched layers with no batch norm before them (after one, an image's activation
        depends on the other images of its minibatch). With statistics frozen before the searched layer
        (``bn_statistics="frozen-before"``), the input of every searched conv or dense layer: everything
        before it is fixed for the pass. A batch norm's own input is stored for its passes only
        (``_own_point``)."""
        if self.config.bn_statistics == "frozen-before":
            return sorted({u.layer_index for u in self.units if u.layer_index > 0 and not u.batch_norm})
        first_bn = next((i for i, l in enumerate(self.layers) if isinstance(l, BatchNorm2d)), len(self.layers))
        return sorted({u.layer_index for u in self.units if 0 < u.layer_index <= first_bn})

    def _own_point(self, d):
        """{d} where layer d is a batch norm searched with statistics frozen before it: its input, the
        conv's output, is fixed for its passes (shift, then scale: 2 * C trials on the same chunks), so
        it is stored for them. Never ahead of time: the conv before it is searched right before it."""
        if self.config.bn_statistics == "frozen-before" and d > 0 and isinstance(self.layers[d], BatchNorm2d):
            return {d}
        return set()

    def _weights_before(self, k):
        """Everything a stored input of layer k was computed from: the weights before layer k, and the
        batch-norm statistics there (fixed for a pass with statistics frozen before the searched layer)."""
        return [p for layer in self.layers[:k] for d in (layer.params, layer.buffers) for p in d.values()]

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

    def _drop_passed(self, keep):
        """Forget the stored inputs not in ``keep`` (the layers whose input this pass may store): they
        served another layer's passes only, as a batch norm's own input (``_own_point``) serves its two.
        Kept beyond them, bn1's (the first conv's output, 3 GB at full MNIST) would still be valid in the
        next round, with conv1 unchanged until its pass, and would crowd conv2's input out of
        ``cache_bytes``: conv2's trials would then compute conv1 on every minibatch. Returns their
        arrays, as ``_drop_stale`` does."""
        return [self._store.pop(k)[1] for k in list(self._store) if k not in keep]

    def _store_inputs(self, d):
        """Make sure the inputs of layer d (and of the searched layers before it, deepest first, as far as
        ``cache_bytes`` allows) are stored for every training image; returns (k, acts): the deepest stored
        layer k <= d and its input (k = 0: the training images themselves)."""
        storable = set(self._points) | self._own_point(d)
        spare = self._drop_stale() + self._drop_passed(storable)
        points = [k for k in sorted(storable, reverse=True) if k <= d]
        k0 = next((k for k in points if k in self._store), 0)
        want = self._plan_store([k for k in points if k > k0], spare)
        if want:
            self._store_pass(self._store[k0][1] if k0 else self.x, k0, want)
            for k, acts in want.items():
                self._store[k] = ([p.copy() for p in self._weights_before(k)], acts)
        k = max([k0, *want])
        return k, (self._store[k][1] if k else self.x)

    def _plan_store(self, points, spare):
        """{layer k: an empty array for its input on every training image} for the layers of ``points``
        (deepest first) that fit in ``cache_bytes``, reusing the arrays of ``spare`` of the right shape."""
        x = self.x
        want, used = {}, self._stored_bytes()
        for k in points:
            probe = self.model.forward(x[:1], check=False, stop=k)
            need = x.shape[0] * probe.size * probe.dtype.itemsize
            if used + need <= self.cache_bytes:
                shape = (x.shape[0],) + probe.shape[1:]
                same = next((i for i, a in enumerate(spare) if a.shape == shape and a.dtype == probe.dtype), None)
                want[k] = spare.pop(same) if same is not None else _empty_like_activation(self.xp, shape, probe.dtype)
                used += need
        return want

    def _stored_bytes(self):
        """The bytes of the inputs stored for every image (what ``cache_bytes`` bounds)."""
        return sum(a.nbytes for _, a in self._store.values())

    def _store_pass(self, src, k0, want):
        """One forward pass from the input ``src`` of layer k0 over the training set, a chunk of images at
        a time, writing the input of every layer of ``want`` into its array."""
        ws = Workspace() if _staging(self.xp) else None
        stops = sorted(want)
        for s in range(0, self.x.shape[0], 1024):
            a, k = src[s:s + 1024], k0
            for stop in stops:
                dst = want[stop][s:s + 1024]
                self._store_segment(self.layers[k:stop], a, dst, ws)
                a, k = dst, stop

    @staticmethod
    def _store_segment(seg, a, dst, ws):
        """dst[...] = the layers ``seg`` applied to a; a segment that ends conv (+ pooling) + ReLU has
        the conv write straight into dst."""
        c = max((i for i, l in enumerate(seg) if isinstance(l, Conv2d)), default=None)
        if (c is not None and c + block_size(seg, c) == len(seg) - 1 and isinstance(seg[-1], ReLU)
                and dst.ndim == 4 and not isinstance(_folded_pool(seg, c), GlobalAvgPool2d)):
            conv_block(seg, c, forward_grouped(seg[:c], a, ws=ws), out=dst.transpose(0, 2, 3, 1), relu=True)
        else:
            dst[...] = forward_grouped(seg, a, ws=ws)

    def _prefix_getter(self, d):
        """A function rows -> input of layer d for a minibatch (B, ...): gathered from the stored input
        of layer d (for every image, or 8. for every chunk), or computed on the minibatch from the deepest
        stored layer before it. Also the stored input of layer d itself, or None."""
        k, acts = self._store_inputs(d)
        if k != d and self._per_chunk(d):
            chunked = self._store_chunks(d, k, acts)
            if chunked is not None:
                return (lambda rows: chunked[rows]), chunked
        if k == d:
            return (lambda rows: acts[rows]), acts
        return (lambda rows: forward_grouped(self.layers[k:d], acts[rows])), None

    # ------------------------------------------------------------------- 8. per-chunk stored inputs
    def _per_chunk(self, d):
        """Whether layer d's input is stored per chunk: batch norm with the minibatch's statistics before
        it (so no input of layer d is a property of one image) and chunked minibatches. During d's pass
        the layers before it do not change and a trial's minibatch is always one of the pass's chunks, so
        what the literal engine computes for a trial, the layers before d on that chunk with the chunk's
        own statistics, is the same every time the chunk comes back."""
        return (PER_CHUNK and self.config.bn_statistics == "minibatch" and self.config.minibatches == "chunks"
                and d > 0)

    def _store_chunks(self, d, k, src):
        """The input of layer d for every chunk of this pass's shuffle, each computed from ``src`` (the
        stored input of layer k < d) on the chunk alone, written at the chunk's rows: then ``acts[rows]``
        is the chunk's input, its batch statistics its own. Images in no chunk (the remainder of the
        shuffle) get zeros. None where it does not fit in ``cache_bytes``."""
        B, x, xp = self.config.batch_size, self.x, self.xp
        probe = self.model.forward(x[:1], check=False, stop=d)
        shape = (x.shape[0],) + probe.shape[1:]
        if self._stored_bytes() + x.shape[0] * probe[0].size * probe.dtype.itemsize > self.cache_bytes:
            return None
        acts = self._chunk_acts
        if acts is None or acts.shape != shape or acts.dtype != probe.dtype:
            self._chunk_acts = acts = None                 # the last pass's array goes before the new one comes
            acts = self._chunk_acts = _empty_like_activation(xp, shape, probe.dtype)
        perm, n = xp.asarray(self._perm), x.shape[0] // B
        for c in range(n):
            rows = perm[c * B:(c + 1) * B]
            acts[rows] = forward_grouped(self.layers[k:d], src[rows])
        acts[perm[n * B:]] = 0
        return acts

    # ------------------------------------------------------------------- 6. one layer, decided on the device
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
        # the pass's arrays go now, before the next pass makes its own: a ChannelDelta keeps its chosen
        # steps as bound methods (a reference cycle), so without this its workspace and kept channels
        # (hundreds of MB at minibatch 5000) would wait for Python's cycle collector, passes later
        del trial
        gc.collect()
        return picked if xp is np else picked.get()

    def _trial_fn(self, unit):
        """The function (j, rows, w0, wp, wm) -> (F(W+dW), F(W), F(W-dW)) for the trials of ``unit``."""
        d = unit.layer_index
        layer = self.layers[d]
        get_h, stored = self._prefix_getter(d)
        if isinstance(layer, Dense) and d == len(self.layers) - 1:
            return DenseShortcut(self, unit, get_h)
        m = mixing_after(self.layers, d)
        if isinstance(layer, (Conv2d, BatchNorm2d)) and m is not None and (
                m == len(self.layers) or isinstance(self.layers[m], (Conv2d, Dense))):
            kind = KeptChannels if self._keeps_channels(unit, m, stored) else ChannelDelta
            return kind(self, unit, m, get_h, stored)
        return Batched(self, unit, get_h)

    def _keeps_channels(self, unit, m, stored):
        """Whether the trials of ``unit`` (channel delta to mixing layer m) use 7. kept channels: a conv's
        weights, chunked minibatches, the input stored, a mixing layer after it, NumPy, and each chunk
        coming back at least ``KEPT_VISITS`` times within one output channel's trials."""
        return (KEPT and self.config.minibatches == "chunks" and self.xp is np and stored is not None
                and isinstance(self.layers[unit.layer_index], Conv2d) and unit.name.endswith(".weight")
                and m < len(self.layers) and chunks_come_back(unit.array[0].size, self.x.shape[0],
                                                              self.config.batch_size))

    def losses(self, logits, rows, groups):
        return group_losses(logits, self.y[rows], groups, self.config.loss_agg)


# --------------------------------------------------------------------------- the trials


class Batched:
    """4. Batched candidates, and nothing else: W + dW, W and W - dW through layers d.. as one batch of
    3B. Exact for any layer; used where no other shortcut applies."""

    def __init__(self, engine, unit, get_h):
        self.engine, self.get_h = engine, get_h
        self.flat, self.layers = unit.array.reshape(-1), engine.layers[unit.layer_index:]

    def __call__(self, j, rows, w0, wp, wm):
        h = self.get_h(rows)
        outs = []
        for v in (wp, w0, wm):
            self.flat[j] = v
            outs.append(forward_grouped(self.layers, h, 1))
        self.flat[j] = w0
        return self.engine.losses(self.engine.xp.concatenate(outs), rows, 3)


class DenseShortcut:
    """3. Dense shortcut: W[i, j] of the output layer moves logit i by d * h[:, j] (bias b[i]: by d)."""

    def __init__(self, engine, unit, get_h):
        self.engine, self.get_h = engine, get_h
        self.layer = engine.layers[unit.layer_index]
        self.is_weight, self.shape = unit.name.endswith(".weight"), unit.array.shape

    def __call__(self, j, rows, w0, wp, wm):
        xp = self.engine.xp
        h = self.get_h(rows)
        logits = self.layer.forward(h)                    # with W[j] = w0
        if self.is_weight:
            i, col = divmod(j, self.shape[1])
            hj = h[:, col]
        else:
            i, hj = j, xp.ones(h.shape[0], dtype=h.dtype)
        cand = xp.concatenate([logits, logits, logits])
        B = h.shape[0]
        cand[:B, i] += (wp - w0) * hj                     # float32 differences, as in the weights
        cand[2 * B:, i] += (wm - w0) * hj
        return self.engine.losses(cand, rows, 3)


class ChannelDelta:
    """2. Channel delta: a conv weight (or bias, or batch-norm scale or shift) of output channel o of
    layer d moves only channel o up to the next mixing layer m (a conv or dense layer, or the output).

    A trial: layer d's output z with the current weight; the unperturbed network up to and through
    layer m (y); channel o of the three candidates through the per-channel layers between (da: the two
    changes); their effect through layer m on channel o alone (dy); the 3B batch y + dy through the rest.
    Each step is one method; where the CPU staging of ``fast_kernels`` applies, the staged version of a
    step is chosen here, once for the layer pass.
    """

    def __init__(self, engine, unit, m, get_h, stored):
        layers, d = engine.layers, unit.layer_index
        self.engine, self.xp, self.layers, self.get_h, self.stored = engine, engine.xp, layers, get_h, stored
        self.layer, self.shape, self.d, self.m = layers[d], unit.array.shape, d, m
        # the route of a trial: layer d (+ pooling folded into it), the per-channel layers between, the
        # mixing layer m (+ its folded pooling), the rest of the network from after_at on
        self.pool = _folded_pool(layers, d)
        self.between = layers[d + block_size(layers, d):m]
        self.mix = layers[m] if m < len(layers) else None
        self.after_at = m + (block_size(layers, m) if isinstance(self.mix, Conv2d) else 1)
        nxt = self.after_at + 1 if self.after_at < len(layers) and isinstance(layers[self.after_at], ReLU) \
            else self.after_at                             # the conv after layer m, if only a ReLU lies between
        self.next_conv = nxt if nxt < len(layers) and isinstance(layers[nxt], Conv2d) else None
        seq = layers[self.after_at:self.after_at + 3]      # or batch norm (searching: batch statistics), ReLU, conv
        self.next_bn = seq[0] if [type(l) for l in seq] == [BatchNorm2d, ReLU, Conv2d] and seq[0].training else None
        self._choose_steps(isinstance(self.layer, Conv2d), unit.name.endswith(".weight"))

    def _choose_steps(self, conv, weight):
        """Each step's version for this layer pass: by what is searched (conv weight, conv bias,
        batch-norm scale or shift), and staged where the CPU staging of ``fast_kernels`` applies."""
        cpu = _staging(self.xp)
        self.ws = Workspace() if cpu else None             # the trial's arrays, kept between trials
        self._norm = None                                  # batch norm searched: (h, 1/std, -mean/std)
        if conv and weight:
            self.output = self._output_staged if cpu and self.stored is not None else self._output_conv_weight
        elif cpu and isinstance(self.layer, BatchNorm2d) and self.layer.training:
            self.output = self._output_bn
        else:
            self.output = self._output
        self.piece = (self._piece_slice if conv and weight else self._piece_xhat if weight else self._piece_ones)
        staged_mix = [type(l) for l in self.between] in ([ReLU], [BatchNorm2d, ReLU])
        self.through_mix = (self._through_mix_staged if cpu and isinstance(self.mix, Conv2d) and staged_mix
                            else self._through_mix)
        if self.mix is None:
            self.rest = self._rest_unmixed
        else:
            staged = cpu and isinstance(self.mix, Conv2d)
            self.rest = (self._rest_staged if staged and self.next_conv is not None else
                         self._rest_staged_bn if staged and STAGED_BN and self.next_bn is not None else self._rest)

    def __call__(self, j, rows, w0, wp, wm):
        z, hc = self.output(j, rows)                       # layer d (+ its folded pooling), W[j] = w0
        o, piece = self.piece(j, z, hc)                    # z[:, o] moves by dW * piece
        a, y = self.through_mix(z)                         # the unperturbed network up to and through m
        da, cols, _ = self._channel_change(z[:, o], o, piece, wp - w0, wm - w0)
        f = self.engine.losses(self.rest(a, y, da, o, cols), rows, 3)
        # a candidate whose change vanished before the next mixing layer (a channel that ReLU zeroes,
        # say) leaves the network's output as it is: its loss is F(W) exactly, a tie, as in the literal
        # engine (rows of one batch may be rounded differently, so this is not left to the arithmetic)
        B, xp = da.shape[0] // 2, self.xp
        moved = xp.stack([xp.any(da[:B] != 0), xp.asarray(True), xp.any(da[B:] != 0)])
        return xp.where(moved, f, f[KEEP])

    # layer d's output: (z, hc), hc the padded input channel c of a conv weight W[o, c, ki, kj] (else None)
    def _input(self, rows):
        """Layer d's input for the minibatch; on the CPU, from a stored input, gathered into the workspace
        (the same numbers as ``get_h``, without a fresh array each trial)."""
        if self.ws is None or self.stored is None or not channels_last(self.stored):
            return self.get_h(rows)
        B, C, H, W = (len(rows),) + self.stored.shape[1:]
        return staged_rows(self.stored, rows).array(self.ws.get("h", (B, H, W, C), self.stored.dtype))

    def _output(self, j, rows):
        h = self._input(rows)
        z = conv_block(self.layers, self.d, h) if isinstance(self.layer, Conv2d) else self.layer.forward(h)
        return z, None

    def _output_conv_weight(self, j, rows):
        h, p = self.get_h(rows), self.layer.padding
        hc = h[:, np.unravel_index(j, self.shape)[1]]
        return conv_block(self.layers, self.d, h), (self.xp.pad(hc, ((0, 0), (p, p), (p, p))) if p else hc)

    def _output_staged(self, j, rows):
        """The same, the minibatch gathered from the stored input while the conv copies it, input channel
        c kept on the side in a padded array whose border stays zero."""
        c, p = np.unravel_index(j, self.shape)[1], self.layer.padding
        B, _, H, W = (len(rows),) + self.stored.shape[1:]
        hc = self.ws.get("hc", (B, H + 2 * p, W + 2 * p), self.stored.dtype, zero=True)
        z = conv_block(self.layers, self.d, staged_rows(self.stored, rows, c, hc[:, p:p + H, p:p + W]), ws=self.ws)
        return z, hc

    def _output_bn(self, j, rows):
        """Batch norm searched (the minibatch's statistics): out = h * scale + shift in one pass from the
        channel sums (``fast_kernels.bn_scale_shift``), with 1 / std and -mean / std kept for the piece."""
        h = self._input(rows)
        if not channels_last(h):
            self._norm = None
            return self.layer.forward(h), None
        g, b = self.layer.params["weight"], self.layer.params["bias"]
        inv, shift0 = (a[0] for a in bn_scale_shift(h, np.ones_like(g), np.zeros_like(b), self.layer.eps))
        self._norm = (h, inv, shift0)
        N, C, H, W = h.shape
        out = self.ws.get("bn_out", (N, H, W, C), h.dtype)
        np.multiply(h.transpose(0, 2, 3, 1), inv * g, out=out)
        out += shift0 * g + b
        return out.transpose(0, 3, 1, 2), None

    # what dW multiplies in channel o: (o, piece)
    def _piece_slice(self, j, z, hc):
        """Conv weight W[o, c, ki, kj]: input channel c shifted by the tap (ki, kj), pooled as z is."""
        o, _, ki, kj = np.unravel_index(j, self.shape)
        s, p, k = self.layer.stride, self.layer.padding, self.layer.kernel_size
        OH, OW = F.conv_output_size(hc.shape[1] - 2 * p, k, s, p), F.conv_output_size(hc.shape[2] - 2 * p, k, s, p)
        piece = hc[:, ki:ki + s * OH:s, kj:kj + s * OW:s]
        if self.pool is not None:                          # the folded pooling is linear: pool the piece
            piece = self.pool.forward(piece[:, None])[:, 0]     # (B, OH', OW'), or (B,) if global
        return o, piece

    def _piece_xhat(self, j, z, hc):
        """Batch-norm scale gamma[o]: moves channel o by d * xhat[:, o]."""
        if self._norm is not None:                         # from _output_bn
            h, inv, shift0 = self._norm
            return j, h[:, j] * inv[j] + shift0[j]
        return j, self.layer._cache[0][:, j]

    def _piece_ones(self, j, z, hc):
        """Conv bias b[o] or batch-norm shift beta[o]: moves channel o by d everywhere."""
        return j, self.xp.ones(z.shape[:1] + z.shape[2:], dtype=z.dtype)

    # the unperturbed network up to the mixing layer m (a) and through it (y)
    def _through_mix(self, z):
        a = forward_grouped(self.between, z, 1, self.ws)
        if self.mix is None:
            return a, a
        if isinstance(self.mix, Conv2d):
            return a, conv_block(self.layers, self.m, a)
        return a, self.mix.forward(a)

    def _through_mix_staged(self, z):
        """Only a ReLU (or batch norm and a ReLU) between: applied while layer m's conv copies z (a itself
        is never made)."""
        if self._bn_relu_stageable(z):
            return None, self._mix_of_bn_relu(z, ws=self.ws)
        if isinstance(self.between[0], BatchNorm2d):
            x = staged_relu(forward_grouped(self.between[:1], z, 1, self.ws))
        else:
            x = staged_relu(z)
        return None, conv_block(self.layers, self.m, x, ws=self.ws)

    def _bn_relu_stageable(self, z):
        """Whether layers d+1..m are batch norm (the batch's statistics), ReLU and a conv, z channels-last."""
        return (isinstance(self.mix, Conv2d) and [type(l) for l in self.between] == [BatchNorm2d, ReLU]
                and self.between[0].training and channels_last(z))

    def _mix_of_bn_relu(self, z, ws=None, without=None, out=None):
        """Layer m's conv of relu(bn(z)) with z's batch statistics, batch norm and ReLU applied as the conv
        copies z; channel ``without`` (if given) scaled and shifted to 0, so it adds nothing. ``ws``: the
        trial's workspace, or None for an array of its own (one that is kept); ``out``: the NCHW view of
        an (N, OH, OW, C) array to write it into instead (one that was kept before)."""
        bn = self.between[0]
        scale, shift = bn_scale_shift(z, bn.params["weight"], bn.params["bias"], bn.eps)
        if without is not None:
            scale[:, without], shift[:, without] = 0, 0
        into = None if out is None else out.transpose(0, 2, 3, 1)
        return conv_block(self.layers, self.m, staged_bn_relu(z, scale, shift), ws=ws, out=into)

    def _channel_change(self, zo, o, piece, dp, dm):
        """Channel o of layer d's output, zo (B, ...), for W + dW, W and W - dW through the per-channel
        layers between, all three by one route so that their differences are exact (a change that
        vanishes, at a ReLU say, is exactly zero): (da (2B, ...) the changes of W + dW and W - dW, cols:
        where they sit in layer m's input, and channel o there for W itself)."""
        xp, ws, B = self.xp, self.ws, zo.shape[0]
        if ws is None or xp.result_type(zo, dp, piece) != zo.dtype:
            zc = xp.concatenate([zo + dp * piece, zo, zo + dm * piece])[:, None]
        else:                                              # the same sums, in arrays kept between trials
            zc = ws.get("zc", (3 * B, 1) + zo.shape[1:], zo.dtype)
            for k, d in ((0, dp), (2, dm)):
                part = zc[k * B:(k + 1) * B, 0]
                np.add(zo, np.multiply(piece, d, out=part), out=part)
            zc[B:2 * B, 0] = zo
        ac = forward_channel(self.between, zc, o, 3, ws)
        if ac.ndim == 4:                                   # still images: channel o
            cols = slice(o, o + 1)
        else:                                              # flattened or pooled to (B, C*H*W): its block
            ac = ac.reshape(3 * B, -1)
            cols = slice(o * ac.shape[1], (o + 1) * ac.shape[1])
        base = ac[B:2 * B]
        if ws is None:
            return xp.concatenate([ac[:B] - base, ac[2 * B:] - base]), cols, base
        da = ws.get("da", (2 * B,) + ac.shape[1:], ac.dtype)
        np.subtract(ac[:B], base, out=da[:B])
        np.subtract(ac[2 * B:], base, out=da[B:])
        return da, cols, base

    # the candidates through the rest of the network: logits (3B, K)
    def _dy(self, da, o, cols):
        """The change of layer m's output: layer m applied to channel o's change alone (no bias)."""
        if isinstance(self.mix, Conv2d):
            return conv_block(self.layers, self.m, da, slice(o, o + 1), self.ws)
        return da @ self.mix.params["weight"][:, cols].T  # dense after flatten / global pooling

    def _rest(self, a, y, da, o, cols):
        dy, B, xp = self._dy(da, o, cols), y.shape[0], self.xp
        yc = self._activation("yc", (3 * B,) + y.shape[1:], y.dtype)
        xp.add(y, dy[:B], out=yc[:B])
        yc[B:2 * B] = y
        xp.add(y, dy[B:], out=yc[2 * B:])
        return forward_grouped(self.layers[self.after_at:], yc, 3, self.ws)

    def _activation(self, key, shape, dtype):
        """An empty activation (channels-last in memory), kept in the workspace between trials."""
        if self.ws is None or len(shape) != 4:
            return _empty_like_activation(self.xp, shape, dtype)
        N, C, H, W = shape
        return self.ws.get(key, (N, H, W, C), dtype).transpose(0, 3, 1, 2)

    def _rest_staged(self, a, y, da, o, cols):
        """y + dy (and the ReLU after layer m) done while the next conv copies its input."""
        dy, nc = self._dy(da, o, cols), self.next_conv
        out = conv_block(self.layers, nc, staged_candidates(y, dy, nc > self.after_at), ws=self.ws)
        return forward_grouped(self.layers[nc + block_size(self.layers, nc):], out, 3, self.ws)

    def _rest_staged_bn(self, a, y, da, o, cols):
        """Batch norm and ReLU between layer m and the next conv: each candidate's statistics from y and dy
        block by block, and y + dy, batch norm and ReLU done while the next conv copies its input (the 3B
        batch itself is never stored)."""
        dy, bn, nc = self._dy(da, o, cols), self.next_bn, self.after_at + 2
        if not (channels_last(y) and channels_last(dy)):
            return self._rest(a, y, da, o, cols)
        norm = candidates_bn_scale_shift(y, dy, bn.params["weight"], bn.params["bias"], bn.eps)
        out = conv_block(self.layers, nc, staged_candidates(y, dy, True, norm), ws=self.ws)
        return forward_grouped(self.layers[nc + block_size(self.layers, nc):], out, 3, self.ws)

    def _rest_unmixed(self, a, y, da, o, cols):
        """No mixing layer after d: the changes go straight into a (the output side of the network)."""
        B = a.shape[0]
        yc = self.xp.concatenate([a, a, a])
        yc[:B, cols] += da[:B]
        yc[2 * B:, cols] += da[B:]
        return forward_grouped(self.layers[self.after_at:], yc, 3)


class KeptChannels(ChannelDelta):
    """7. Kept channels: the channel delta of a conv weight with chunked minibatches, keeping per chunk
    what the trials of one output channel share.

    With ``minibatches="chunks"`` the same B images come back every (training images / B) trials, and in
    the search order of a conv (output channel, input channel, kernel row, kernel column) the
    C_in*KH*KW trials of output channel o follow one another. While they run, only channel o of layer
    d's output z changes, so, per chunk, this keeps:

    - ``z_o``, channel o of z (in float64), brought up to date on each visit with the weight changes
      made since the chunk was last seen: W[o, c, ki, kj] += delta moves z_o by delta times the shifted
      (and pooled) input channel c, so all changes of the chunk's absence are one convolution of the
      input channels they touch with a kernel of those deltas;
    - ``y_rest``, layer m's output with channel o of its input set to zero, fixed while o is.

    A trial then needs neither layer d's convolution nor layer m's on all channels: layer m's output for
    W is y_rest + (layer m on channel o alone), and the candidates go on through the rest as in 2. The
    kept arrays are dropped when o changes; a chunk's first visit for an output channel computes them
    from the stored input. NumPy only: which weights changed is looked at on the host every trial.
    """

    def __init__(self, engine, unit, m, get_h, stored):
        super().__init__(engine, unit, m, get_h, stored)
        self.W = unit.array                                # (C_out, C_in, KH, KW), changed by the search
        self.o, self.kept, self.log, self.logged = None, {}, [], None
        self.spare = []                                    # the last output channel's kept arrays, for reuse

    def __call__(self, j, rows, w0, wp, wm):
        o, c, _, _ = np.unravel_index(j, self.shape)
        self._log_changes(o)
        zo, y_rest, hc = self._kept(rows, c)               # brought up to date; hc: input channel c, padded
        _, piece = self._piece_slice(j, None, hc)
        da, cols, base = self._channel_change(zo.astype(np.float32), o, piece, wp - w0, wm - w0)
        y = self._activation("y", y_rest.shape, y_rest.dtype)   # layer m's output for W: y_rest + its channel o
        if isinstance(self.mix, Conv2d) and channels_last(y_rest) and channels_last(y):
            conv_block(self.layers, self.m, base, slice(o, o + 1), out=y.transpose(0, 2, 3, 1), add=y_rest)
        else:
            np.add(y_rest, self._dy(base, o, cols), out=y)
        f = self.engine.losses(self.rest(None, y, da, o, cols), rows, 3)
        B = da.shape[0] // 2                               # as in ChannelDelta: a vanished change is a tie
        moved = np.array([np.any(da[:B] != 0), True, np.any(da[B:] != 0)])
        return np.where(moved, f, f[KEEP])

    def _log_changes(self, o):
        """Note which weights of output channel o changed since the last trial, and by how much (the
        decision of the last trial and this trial's weight decay); a new o drops everything kept."""
        w = self.W[o].reshape(-1)
        if o != self.o:
            self.spare = [entry[:2] for entry in self.kept.values()]     # written over, not faulted in anew
            self.o, self.kept, self.log = o, {}, []
        else:
            changed = np.flatnonzero(w != self.logged)
            if changed.size:
                self.log.append((changed, w[changed].astype(np.float64) - self.logged[changed]))
        self.logged = w.astype(np.float64)

    def _kept(self, rows, c):
        """(z_o, y_rest, hc) for the chunk of these rows: computed on its first visit for this output
        channel, brought up to date with the logged changes on the others."""
        key = rows.tobytes()
        entry = self.kept.get(key)
        pending = {} if entry is None else self._pending(entry[2])
        channels = sorted({c, *(np.unravel_index(t, self.shape[1:])[0] for t in pending)})
        h = gather_channels(self.stored, rows, channels, self.ws, "kept_h")   # (B, len(channels), H, W)
        if entry is None:
            entry = self.kept[key] = self._first_visit(rows)
        elif pending:
            dk = np.zeros((1, len(channels)) + self.shape[2:], dtype=np.float64)
            for t, delta in pending.items():
                ci, ki, kj = np.unravel_index(t, self.shape[1:])
                dk[0, channels.index(ci), ki, kj] = delta
            change = conv_block(self.layers, self.d, h, weight=dk.astype(h.dtype), ws=self.ws)
            entry[0] += change[:, 0]
        entry[2] = len(self.log)
        p = self.layer.padding
        hc = self.ws.get("hc", (h.shape[0], h.shape[2] + 2 * p, h.shape[3] + 2 * p), h.dtype, zero=True)
        hc[:, p:p + h.shape[2], p:p + h.shape[3]] = h[:, channels.index(c)]
        return entry[0], entry[1], hc

    def _pending(self, seen):
        """The logged changes after the first ``seen``, summed per weight: {flat index in W[o]: delta}."""
        total = {}
        for changed, deltas in self.log[seen:]:
            for t, delta in zip(changed.tolist(), deltas.tolist()):
                total[t] = total.get(t, 0.0) + delta
        return total

    def _first_visit(self, rows):
        """[z_o (float64), y_rest, log position] of a chunk, from its stored input and the weights now; z
        in the workspace, z_o and y_rest in the arrays the last output channel kept, where there are."""
        o = self.o
        z = conv_block(self.layers, self.d, staged_rows(self.stored, rows), ws=self.ws)  # gathered as it copies
        old_zo, old_rest = self.spare.pop() if self.spare else (None, None)
        if old_zo is None:
            zo = z[:, o].astype(np.float64)
        else:
            zo = old_zo
            np.copyto(zo, z[:, o])
        if self._bn_relu_stageable(z):
            return [zo, self._mix_of_bn_relu(z, without=o, out=old_rest), len(self.log)]
        a = forward_grouped(self.between, z, 1)            # arrays of its own (z is not needed after this)
        if a.ndim == 4:
            a[:, o] = 0
        else:                                              # flattened or pooled: channel o's block of columns
            width = a.shape[1] // self.shape[0]
            a[:, o * width:(o + 1) * width] = 0
        if isinstance(self.mix, Conv2d):
            y_rest = conv_block(self.layers, self.m, a)
        else:
            y_rest = self.mix.forward(a)
        return [zo, y_rest, len(self.log)]
