import os
from pathlib import Path

import numpy as np
import pytest

from rso_np.backend import gpu_available

_GPU = gpu_available()
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module under test: NumPy always, CuPy where it imports and sees a device."""
    if request.param == "numpy":
        return np
    if not _GPU:
        pytest.skip("CuPy or a CUDA device is not available")
    import cupy
    return cupy


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def mnist_dir(name="mnist"):
    """Folder with the real IDX files: $RSO_NP_DATA/<name> or ../shared/data/<name>; None if absent."""
    for base in (os.environ.get("RSO_NP_DATA"), SHARED_DATA):
        if base and (Path(base) / name / "train-images-idx3-ubyte.gz").exists():
            return Path(base) / name
    return None
