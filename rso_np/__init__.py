"""rso_np: RSO (random search optimisation, Tripathi & Singh 2020) in plain NumPy/CuPy."""

from . import backend, functional, layers, losses, models
from .backend import get_array_module, get_xp, synchronize, to_device, to_numpy
from .model import Sequential

__version__ = "0.1.0"

__all__ = ["backend", "functional", "layers", "losses", "models", "Sequential", "get_xp",
           "get_array_module", "to_numpy", "to_device", "synchronize", "__version__"]
