"""``Sequential``: layers in a row, with named parameters, save/load and device moves."""

import json
import os
import zipfile
import zlib

import numpy as np

from ._io import atomic_path
from ._checks import check_finite, check_float, check_ndim
from .backend import device_of, get_array_module, to_numpy
from . import functional as F
from .layers import BatchNorm2d, Layer

FORMAT = "rso_np.Sequential/1"


class CheckpointError(ValueError):
    """A saved file that cannot be loaded into this model (corrupt, pickled, other architecture)."""


class Sequential:
    """Layers applied in order.

    ``layers`` is a list of ``Layer`` objects or of ``(name, layer)`` pairs.
    Parameter names are ``"<layer name>.<param name>"``, e.g. ``"conv1.weight"``.
    """

    def __init__(self, layers):
        self.layers = []
        self.names = []
        for i, item in enumerate(layers):
            name, layer = item if isinstance(item, tuple) else (f"{i}", item)
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {name!r} is not an rso_np Layer: {layer!r}")
            if name in self.names:
                raise ValueError(f"duplicate layer name {name!r}")
            self.names.append(name)
            self.layers.append(layer)

    # ------------------------------------------------------------------ structure
    def named_layers(self):
        return list(zip(self.names, self.layers))

    def parameters(self):
        """Ordered ``{name: array}`` of all trainable arrays (the same objects the layers use)."""
        return {f"{n}.{k}": v for n, l in self.named_layers() for k, v in l.params.items()}

    def buffers(self):
        return {f"{n}.{k}": v for n, l in self.named_layers() for k, v in l.buffers.items()}

    def gradients(self):
        return {f"{n}.{k}": v for n, l in self.named_layers() for k, v in l.grads.items()}

    def num_weights(self):
        """Number of trainable scalars (11,824 for ``paper_mnist()``; +192 with batch norm)."""
        return int(sum(v.size for v in self.parameters().values()))

    def spec(self):
        return [[n, l.spec()] for n, l in self.named_layers()]

    @property
    def in_channels(self):
        for layer in self.layers:
            if hasattr(layer, "in_channels"):
                return layer.in_channels
        return None

    @property
    def xp(self):
        for v in self.parameters().values():
            return get_array_module(v)
        return np

    @property
    def device(self):
        for v in self.parameters().values():
            return device_of(v)
        return "cpu"

    def __repr__(self):
        body = "\n".join(f"  ({n}): {l!r}" for n, l in self.named_layers())
        return f"Sequential(\n{body}\n)  # {self.num_weights()} weights"

    # ------------------------------------------------------------------ modes and devices
    def train(self, mode=True):
        """Training/search mode: batch norm uses batch statistics."""
        for layer in self.layers:
            layer.training = mode
        return self

    def eval(self):
        """Evaluation mode: batch norm uses its population statistics."""
        return self.train(False)

    def to(self, device_or_xp):
        """Move every parameter and buffer to "cpu"/"gpu" (or numpy/cupy), in place."""
        for layer in self.layers:
            layer.to(device_or_xp)
        return self

    # ------------------------------------------------------------------ compute
    def check_input(self, x):
        check_float("x", x)
        check_ndim("x", x, 4, "(N, C, H, W)")
        c = self.in_channels
        if c is not None and x.shape[1] != c:
            raise ValueError(f"x must have {c} channel(s) (shape (N, {c}, H, W)), got shape {tuple(x.shape)}")
        check_finite("x", x)

    def forward(self, x, check=True, start=0, stop=None):
        """Run layers ``start`` .. ``stop-1`` (all by default) on x (N, C, H, W) float32.

        Returns the logits (N, K). ``check=False`` skips the input checks (hot loops).
        """
        if check and start == 0:
            self.check_input(x)
        for layer in self.layers[start:stop]:
            x = layer.forward(x)
        return x

    __call__ = forward

    def backward(self, dout):
        """Back-propagate dL/dlogits through all layers; fills each layer's ``grads``. Returns dL/dx."""
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout

    def batch_norms(self):
        """The network's batch-norm layers, in order (an empty list for a network without batch norm)."""
        return [l for l in self.layers if isinstance(l, BatchNorm2d)]

    def set_reference_stats(self, x):
        """Set every batch norm's statistics to those of the one batch ``x`` (N, C, H, W): its input's
        per-channel mean and (biased) variance in a forward pass in training mode, where each batch
        norm normalises with exactly these. What the authors' code does before each layer pass and each
        evaluation (running statistics reset, momentum 0, the first 2000 training images).
        No-op for a network without batch norm.
        """
        if not self.batch_norms():
            return
        was = [l.training for l in self.layers]
        self.train()
        h = x
        for layer in self.layers:
            if isinstance(layer, BatchNorm2d):
                layer.buffers["mean"], layer.buffers["var"] = F.batch_stats(h)
            h = layer.forward(h)
        for layer, t in zip(self.layers, was):
            layer.training = t

    def estimate_population_stats(self, x, batch_size=1000):
        """Set every batch norm's population mean/var from the images ``x`` (N, C, H, W).

        Runs the network in training mode over chunks of ``batch_size`` and
        averages each batch norm's input mean and mean square over all images.
        No-op for a network without batch norm.
        """
        bns = self.batch_norms()
        if not bns:
            return
        xp = get_array_module(x)
        was = [l.training for l in self.layers]
        self.train()
        sums = {id(b): [0.0, 0.0] for b in bns}
        n = x.shape[0]
        for s in range(0, n, batch_size):
            h = x[s:s + batch_size]
            for layer in self.layers:
                if isinstance(layer, BatchNorm2d):
                    w = h.shape[0] / n
                    h64 = h.astype(xp.float64)
                    sums[id(layer)][0] = sums[id(layer)][0] + w * h64.mean(axis=(0, 2, 3))
                    sums[id(layer)][1] = sums[id(layer)][1] + w * (h64 ** 2).mean(axis=(0, 2, 3))
                h = layer.forward(h)
        for b in bns:
            m, m2 = sums[id(b)]
            b.buffers["mean"] = m.astype(xp.float32)
            b.buffers["var"] = xp.maximum(m2 - m ** 2, 0).astype(xp.float32)
        for layer, t in zip(self.layers, was):
            layer.training = t

    # ------------------------------------------------------------------ save / load
    def state_dict(self):
        """Host copies of parameters and buffers: ``{"param/<name>": ..., "buffer/<name>": ...}``."""
        d = {f"param/{k}": to_numpy(v) for k, v in self.parameters().items()}
        d.update({f"buffer/{k}": to_numpy(v) for k, v in self.buffers().items()})
        return d

    def save(self, path, extra=None):
        """Write parameters, buffers and the architecture to ``path`` (.npz), atomically.

        ``extra`` is an optional dict of further NumPy arrays (no objects) to store.
        """
        arrays = self.state_dict()
        arrays["__format__"] = np.array(FORMAT)
        arrays["__arch__"] = np.array(json.dumps(self.spec()))
        for k, v in (extra or {}).items():
            arrays[f"extra/{k}"] = np.asarray(v)
        atomic_savez(path, arrays)

    def load(self, path, data=None):
        """Load what :meth:`save` wrote; returns the ``extra`` arrays as a dict.

        ``data``: the file's arrays when the caller has already read them with :func:`read_npz`.
        Refuses files with pickled objects and files of another architecture with a
        ``CheckpointError`` that says what differs.
        """
        data = read_npz(path) if data is None else data
        if str(data.get("__format__", "")) != FORMAT:
            raise CheckpointError(f"{path}: not an rso_np model file (no '__format__' = {FORMAT!r})")
        arch = json.loads(str(data["__arch__"]))
        if arch != self.spec():
            raise CheckpointError(f"{path}: architecture mismatch: file has {_summary(arch)}, "
                                  f"model is {_summary(self.spec())}")
        xp = self.xp
        for prefix, store in (("param/", "params"), ("buffer/", "buffers")):
            for n, layer in self.named_layers():
                for k, cur in getattr(layer, store).items():
                    key = f"{prefix}{n}.{k}"
                    if key not in data:
                        raise CheckpointError(f"{path}: missing array {key!r}")
                    arr = data[key]
                    if arr.shape != cur.shape or arr.dtype != cur.dtype:
                        raise CheckpointError(f"{path}: {key} has shape {arr.shape} {arr.dtype}, "
                                              f"model expects {cur.shape} {cur.dtype}")
                    # in place, so that references held elsewhere stay valid
                    cur[...] = xp.asarray(arr)
        return {k[len("extra/"):]: v for k, v in data.items() if k.startswith("extra/")}


def _summary(arch):
    return "[" + ", ".join(f"{n}:{s['type']}" + (
        f"({s.get('in_channels', s.get('in_features', s.get('num_features', '')))}"
        f"->{s.get('out_channels', s.get('out_features', ''))})" if len(s) > 1 else "")
        for n, s in arch) + "]"


def atomic_savez(path, arrays):
    """``np.savez_compressed`` to a temporary file beside ``path``, then rename: never a half-written
    file. Compressed, because a run's checkpoint carries its history as JSON text, which NumPy stores
    as 4 bytes per character: 515 KB after 42 rounds of the paper's run, a fraction of that deflated.
    """
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def read_npz(path):
    """All arrays of an .npz as a dict, with ``allow_pickle=False``; clear errors for bad files."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise CheckpointError(f"{path}: holds pickled Python objects, which are refused "
                                  "(allow_pickle=False)") from None
        raise CheckpointError(f"{path}: not a readable .npz file ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated .npz file ({exc})") from None
