"""Layers: objects that hold parameters as named arrays and run the kernels.

Every layer has ``forward(x)``, ``backward(dout)`` (which returns dL/dx and
fills ``self.grads``) and ``parameters()`` (name -> array). Parameters are
changed in place by the optimisers (RSO changes one scalar at a time), so the
arrays a layer holds are the arrays the optimiser sees.
"""

import numpy as np

from . import fast_kernels
from . import functional as F
from .backend import to_device


def _rng(seed_or_rng):
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


def he_normal(shape, fan_in, rng):
    """N(0, sqrt(2 / fan_in)) as float32: the paper's (He) initialisation, line 2 of Algorithm 1."""
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


class Layer:
    """Base class. Subclasses fill ``params`` (and ``buffers``) in ``__init__``."""

    def __init__(self):
        self.params = {}    # searched / trained arrays
        self.buffers = {}   # saved but not trained (batch-norm population statistics)
        self.grads = {}
        self.training = True

    def parameters(self):
        return dict(self.params)

    def spec(self):
        """A JSON-able description used to check architectures on load."""
        return {"type": type(self).__name__}

    def to(self, device_or_xp):
        for d in (self.params, self.buffers):
            for k in d:
                d[k] = to_device(d[k], device_or_xp)
        return self

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "type")
        return f"{type(self).__name__}({args})"


class Conv2d(Layer):
    """Convolution. weight (C_out, C_in, KH, KW), optional bias (C_out,). x (N, C_in, H, W)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, bias=False, rng=None):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = int(kernel_size), int(stride), int(padding)
        rng = _rng(rng)
        k = self.kernel_size
        fan_in = self.in_channels * k * k  # |w_id|: the kernel that produces one output channel
        self.params["weight"] = he_normal((self.out_channels, self.in_channels, k, k), fan_in, rng)
        if bias:
            self.params["bias"] = np.zeros(self.out_channels, dtype=np.float32)

    def spec(self):
        return {"type": "Conv2d", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "bias": "bias" in self.params}

    def forward(self, x):
        self._x = x
        # functional.conv2d's numbers; on the CPU a few images at a time, on every core (fast_kernels)
        return fast_kernels.conv2d(x, self.params["weight"], self.params.get("bias"), self.stride, self.padding)

    def backward(self, dout):
        dx, dW, db = F.conv2d_backward(dout, self._x, self.params["weight"], self.params.get("bias"),
                                       self.stride, self.padding)
        self.grads["weight"] = dW
        if db is not None:
            self.grads["bias"] = db
        return dx


class Dense(Layer):
    """Fully connected layer. weight (out, in) (PyTorch's layout), optional bias (out,). x (N, in)."""

    def __init__(self, in_features, out_features, bias=False, rng=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.params["weight"] = he_normal((self.out_features, self.in_features), self.in_features, _rng(rng))
        if bias:
            self.params["bias"] = np.zeros(self.out_features, dtype=np.float32)

    def spec(self):
        return {"type": "Dense", "in_features": self.in_features, "out_features": self.out_features,
                "bias": "bias" in self.params}

    def forward(self, x):
        self._x = x
        return F.linear(x, self.params["weight"], self.params.get("bias"))

    def backward(self, dout):
        dx, dW, db = F.linear_backward(dout, self._x, self.params["weight"], self.params.get("bias"))
        self.grads["weight"] = dW
        if db is not None:
            self.grads["bias"] = db
        return dx


class ReLU(Layer):
    def forward(self, x):
        self._x = x
        return F.relu(x)

    def backward(self, dout):
        return F.relu_backward(dout, self._x)


class MaxPool2d(Layer):
    def __init__(self, kernel_size=2, stride=None):
        super().__init__()
        self.kernel_size, self.stride = int(kernel_size), (None if stride is None else int(stride))

    def spec(self):
        return {"type": "MaxPool2d", "kernel_size": self.kernel_size, "stride": self.stride}

    def forward(self, x):
        self._x = x
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def backward(self, dout):
        return F.max_pool2d_backward(dout, self._x, self.kernel_size, self.stride)


class AvgPool2d(Layer):
    def __init__(self, kernel_size=2, stride=None):
        super().__init__()
        self.kernel_size, self.stride = int(kernel_size), (None if stride is None else int(stride))

    def spec(self):
        return {"type": "AvgPool2d", "kernel_size": self.kernel_size, "stride": self.stride}

    def forward(self, x):
        self._shape = x.shape
        return F.avg_pool2d(x, self.kernel_size, self.stride)

    def backward(self, dout):
        return F.avg_pool2d_backward(dout, self._shape, self.kernel_size, self.stride)


class GlobalAvgPool2d(Layer):
    def forward(self, x):
        self._shape = x.shape
        return F.global_avg_pool2d(x)

    def backward(self, dout):
        return F.global_avg_pool2d_backward(dout, self._shape)


class GlobalMaxPool2d(Layer):
    def forward(self, x):
        self._x = x
        return F.global_max_pool2d(x)

    def backward(self, dout):
        return F.global_max_pool2d_backward(dout, self._x)


class Flatten(Layer):
    def forward(self, x):
        self._shape = x.shape
        return F.flatten(x)

    def backward(self, dout):
        return F.flatten_backward(dout, self._shape)


class BatchNorm2d(Layer):
    """Batch normalisation over (N, H, W) per channel; params weight (gamma) and bias (beta), (C,).

    Mode switch: with ``training = True`` (SGD training and the RSO search) the
    batch's own mean and variance are used; with ``training = False``
    (evaluation) the population statistics in ``buffers["mean"]`` and
    ``buffers["var"]``. Forward never changes the population statistics: they are
    set from data by ``Sequential.estimate_population_stats``.
    """

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.num_features, self.eps = int(num_features), float(eps)
        self.params["weight"] = np.ones(num_features, dtype=np.float32)
        self.params["bias"] = np.zeros(num_features, dtype=np.float32)
        self.buffers["mean"] = np.zeros(num_features, dtype=np.float32)
        self.buffers["var"] = np.ones(num_features, dtype=np.float32)

    def spec(self):
        return {"type": "BatchNorm2d", "num_features": self.num_features, "eps": self.eps}

    def forward(self, x):
        self._batch_stats = self.training
        mean, var = (None, None) if self.training else (self.buffers["mean"], self.buffers["var"])
        out, self._cache = F.batch_norm2d(x, self.params["weight"], self.params["bias"], mean, var, self.eps)
        return out

    def backward(self, dout):
        dx, dg, db = F.batch_norm2d_backward(dout, self._cache, self.params["weight"], self._batch_stats)
        self.grads["weight"], self.grads["bias"] = dg, db
        return dx

