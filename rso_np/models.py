"""Model builders.

``paper_mnist`` is the MNIST network of the authors' own code (see the paper
notes): six 3x3 convolutions with 16 channels, 11,824 weights.
"""

import numpy as np

from .layers import AvgPool2d, BatchNorm2d, Conv2d, Dense, Flatten, GlobalAvgPool2d, GlobalMaxPool2d, MaxPool2d, ReLU
from .model import Sequential


def _rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


GLOBAL_POOLS = {"avg": GlobalAvgPool2d, "max": GlobalMaxPool2d}
BN_EPS = 1e-5             # batch norm's epsilon in the paper's network unless told (PyTorch's default)
GLOBAL_POOL = "avg"       # its global pooling unless told (the paper's description)


def paper_mnist(batch_norm=False, seed=0, channels=16, num_classes=10, in_channels=1, bn_eps=BN_EPS,
                global_pool=GLOBAL_POOL):
    """The authors' MNIST network.

    conv1..conv6: 3x3, padding 1, ``channels`` channels, no bias; 2x2 average
    pooling after conv2 and conv4; batch norm (optional) after every conv, after
    the pooling where there is one; ReLU after conv1..conv5, none after conv6;
    global pooling; dense channels -> num_classes without bias.
    11,824 weights for the defaults (+192 batch-norm parameters). ``bn_eps``: batch norm's epsilon
    (1e-5, PyTorch's default; the authors' MXNet code: 1e-3). ``global_pool``: "avg" (global average
    pooling, the usual reading of the paper) or "max" (the authors' code: MXNet's
    ``nd.Pooling(global_pool=True)`` with no ``pool_type``, whose default is max).
    ``seed``: an int or a ``numpy.random.Generator`` for the He initialisation.
    """
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {sorted(GLOBAL_POOLS)}, got {global_pool!r}")
    rng = _rng(seed)
    layers = []
    c_in = in_channels
    for i in range(1, 7):
        layers.append((f"conv{i}", Conv2d(c_in, channels, 3, padding=1, rng=rng)))
        if i in (2, 4):
            layers.append((f"pool{i}", AvgPool2d(2)))
        if batch_norm:
            layers.append((f"bn{i}", BatchNorm2d(channels, eps=bn_eps)))
        if i < 6:
            layers.append((f"relu{i}", ReLU()))
        c_in = channels
    layers += [("gap" if global_pool == "avg" else "gmp", GLOBAL_POOLS[global_pool]()),
               ("fc", Dense(channels, num_classes, rng=rng))]
    return Sequential(layers)


def small_mnist(seed=0, num_classes=10, in_channels=1, channels=8):
    """A small CNN for laptop runs, tutorials and tests (28x28 input, 4,568 weights).

    conv1 3x3 (1 -> 8, padding 1) -> ReLU -> 2x2 max pool (14x14);
    conv2 3x3 (8 -> 8, padding 1) -> ReLU -> 2x2 max pool (7x7);
    flatten (392) -> dense 392 -> 10, no biases.
    """
    rng = _rng(seed)
    return Sequential([
        ("conv1", Conv2d(in_channels, channels, 3, padding=1, rng=rng)),
        ("relu1", ReLU()),
        ("pool1", MaxPool2d(2)),
        ("conv2", Conv2d(channels, channels, 3, padding=1, rng=rng)),
        ("relu2", ReLU()),
        ("pool2", MaxPool2d(2)),
        ("flatten", Flatten()),
        ("fc", Dense(channels * 7 * 7, num_classes, rng=rng)),
    ])


MODELS = {"paper_mnist": paper_mnist, "paper_mnist_bn": lambda seed=0, **kw: paper_mnist(True, seed, **kw),
          "small_mnist": small_mnist}

# The options each network takes beside its seed, with the value its builder uses unless told: the one
# place that says which network has which option (build_model's checks and model_options read it).
MODEL_OPTIONS = {"paper_mnist": {"global_pool": GLOBAL_POOL},
                 "paper_mnist_bn": {"bn_eps": BN_EPS, "global_pool": GLOBAL_POOL},
                 "small_mnist": {}}
_WHAT = {"bn_eps": "a model with batch norm", "global_pool": "the paper's networks"}


def build_model(name, seed=0, bn_eps=None, global_pool=None):
    """Build a model by name: one of ``MODELS``. ``bn_eps``: batch norm's epsilon (models with batch
    norm only; None: the builder's default). ``global_pool``: "avg" or "max" (the paper's networks only;
    None: the builder's default, "avg"). Which network takes which option: ``MODEL_OPTIONS``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    kw = {key: value for key, value in (("bn_eps", bn_eps), ("global_pool", global_pool)) if value is not None}
    for key in kw:
        if key not in MODEL_OPTIONS[name]:
            having = ", ".join(m for m, options in MODEL_OPTIONS.items() if key in options)
            raise ValueError(f"{key} is for {_WHAT[key]} ({having}), not {name!r}")
    if "bn_eps" in kw:
        if not float(bn_eps) > 0:
            raise ValueError(f"bn_eps must be positive, got {bn_eps}")
        kw["bn_eps"] = float(bn_eps)
    return MODELS[name](seed=seed, **kw)


def model_options(name, bn_eps=None, global_pool=None):
    """``(bn_eps, global_pool)`` as ``build_model(name, bn_eps=..., global_pool=...)`` builds them: the
    given values, or the builder's defaults where None; None for an option that ``name`` does not have.
    A run recorded with None ran with these, and they are what its settings mean."""
    defaults = MODEL_OPTIONS.get(name, {})
    return (defaults.get("bn_eps") if bn_eps is None else bn_eps,
            defaults.get("global_pool") if global_pool is None else global_pool)
