"""The NumPy/CuPy switch.

Every array function in rso_np starts with ``xp = get_array_module(x)`` and then
uses ``xp.`` only, so the same code runs on the CPU (NumPy) and the GPU (CuPy).
Transfers between host and device are explicit: ``to_numpy`` and ``to_device``.
"""

import numpy as np

DEVICES = ("cpu", "gpu")

_CUPY_HELP = (
    "install the CuPy wheel that matches your CUDA toolkit, e.g. "
    "'pip install cupy-cuda12x' (CUDA 12) or 'pip install cupy-cuda13x' (CUDA 13)"
)


class DeviceError(RuntimeError):
    """The GPU was asked for but cannot be used (CuPy missing, or no CUDA device)."""


def _import_cupy():
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise DeviceError(f"device 'gpu' needs CuPy, which is not installed ({exc}); {_CUPY_HELP}") from None
    return cupy


def gpu_available():
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cupy = _import_cupy()
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_xp(device):
    """Return the array module for ``device``: numpy for "cpu", cupy for "gpu".

    Raises ``ValueError`` for an unknown device name and ``DeviceError`` when the
    GPU is asked for but CuPy is not installed or sees no CUDA device.
    """
    if device == "cpu":
        return np
    if device == "gpu":
        cupy = _import_cupy()
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDA driver missing or broken
            raise DeviceError(
                f"device 'gpu': CuPy is installed but found no usable CUDA device ({exc}); "
                "check the NVIDIA driver with 'nvidia-smi', or use --device cpu") from None
        if count < 1:
            raise DeviceError("device 'gpu': CuPy is installed but found no CUDA device; "
                              "use --device cpu")
        return cupy
    raise ValueError(f"device must be one of {DEVICES}, got {device!r}")


def get_array_module(*arrays):
    """The module (numpy or cupy) that the given arrays belong to.

    Plain Python numbers and NumPy arrays give numpy; any CuPy array gives cupy.
    """
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            import cupy
            return cupy
    return np


def device_of(x):
    """"gpu" for a CuPy array, "cpu" otherwise."""
    return "gpu" if get_array_module(x) is not np else "cpu"


def to_numpy(x):
    """Copy ``x`` to the host as a NumPy array (no copy if it is already one)."""
    if get_array_module(x) is np:
        return np.asarray(x)
    return x.get()


def to_device(x, device_or_xp):
    """Move ``x`` to a device given as "cpu"/"gpu" or as the module numpy/cupy."""
    xp = get_xp(device_or_xp) if isinstance(device_or_xp, str) else device_or_xp
    if xp is np:
        return to_numpy(x)
    return xp.asarray(x)


def synchronize(xp):
    """Wait until all queued work on the device of ``xp`` is done (no-op for NumPy)."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()
