import sys

import numpy as np
import pytest

from rso_np import backend


def test_cpu_is_numpy():
    assert backend.get_xp("cpu") is np


def test_unknown_device_named():
    with pytest.raises(ValueError, match="device must be one of .*'tpu'"):
        backend.get_xp("tpu")


def test_gpu_without_cupy_says_which_wheel(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes 'import cupy' fail
    with pytest.raises(backend.DeviceError, match="not installed.*pip install cupy-cuda1"):
        backend.get_xp("gpu")


def test_array_module_and_transfers(xp):
    a = xp.arange(6, dtype=xp.float32)
    assert backend.get_array_module(a) is xp
    assert backend.get_array_module(1.0, a) is xp
    h = backend.to_numpy(a)
    assert isinstance(h, np.ndarray) and h.tolist() == list(range(6))
    back = backend.to_device(h, xp)
    assert backend.get_array_module(back) is xp
    assert backend.to_numpy(backend.to_device(h, "cpu")).tolist() == list(range(6))
    backend.synchronize(xp)
