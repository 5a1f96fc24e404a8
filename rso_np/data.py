"""MNIST and Fashion-MNIST: IDX parsing, verified download, caching, normalisation.

Files live in one folder per dataset, ``<root>/mnist/`` and ``<root>/fashion-mnist/``, each holding the
four original files (``train-images-idx3-ubyte.gz`` ...). ``<root>`` is ``$RSO_NP_DATA`` when set,
else ``$XDG_CACHE_HOME/rso_np`` (``~/.cache/rso_np``). A missing file is downloaded from the well-known
mirrors, checked against its MD5 and SHA-256, and moved into place atomically. ``data_dir`` (``--data-dir``)
names the folder that holds the four files directly, for offline use.

Images come back as float32 (N, 1, 28, 28), normalised to zero mean and unit standard deviation with
the training set's statistics (line 1 of Algorithm 1); labels as int64 (N,).
"""

import gzip
import hashlib
import os
import struct
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from ._io import atomic_path

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# (md5, sha256) of the original .gz files.
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873",
                                       "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432",
                                       "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3",
                                      "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c",
                                      "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                       "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe",
                                       "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79",
                                      "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310",
                                      "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    },
}

MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/",
              "http://yann.lecun.com/exdb/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"],
}

DATASETS = tuple(CHECKSUMS)

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A data file that is missing, corrupt, truncated or fails its checksum; the message names the file."""


# --------------------------------------------------------------------------- IDX


def read_idx(path, expect_ndim=None):
    """Parse an IDX file (plain or .gz) into a NumPy array.

    Checks the magic number (two zero bytes, a type code, the number of dimensions),
    that the dimensions match ``expect_ndim`` when given, and that the file holds
    exactly prod(dims) items. Every error names the file.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc}); the file is corrupt or truncated, delete it "
                        "to download it again") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_TYPES or ndim < 1:
        raise DataError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTNN with a known "
                        "type code TT and NN >= 1 dimensions)")
    if expect_ndim is not None and ndim != expect_ndim:
        raise DataError(f"{path}: IDX file has {ndim} dimension(s), expected {expect_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header says {dims} ({expected} data bytes) but the file holds "
                        f"{len(raw) - header} data bytes (truncated or wrong count)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


# --------------------------------------------------------------------------- files, download


def default_root():
    env = os.environ.get("RSO_NP_DATA")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "rso_np"


def file_digests(path):
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def verify(path, dataset, name=None, shown=None):
    """Raise DataError unless ``path`` has the published MD5 and SHA-256 of file ``name`` (its own name)."""
    want = CHECKSUMS[dataset].get(name or Path(path).name)
    if want is None:
        return
    got = file_digests(path)
    if got[0] != want[0] or got[1] != want[1]:
        raise DataError(f"{shown or path}: checksum mismatch (md5 {got[0]}, expected {want[0]}); "
                        "the file is corrupt or not the original: delete it to download it again")


def download(url, dest, dataset, timeout=60, log=sys.stderr):
    """Fetch ``url`` into ``dest``: temporary file in the same folder, checksum check, then rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest, suffix=".part") as tmp:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            for chunk in iter(lambda: resp.read(1 << 16), b""):
                out.write(chunk)
                done += len(chunk)
                if log is not None and total:
                    print(f"\r  {dest.name}: {done * 100 // total:3d}%", end="", file=log, flush=True)
            if log is not None and total:
                print(file=log)
        verify(tmp, dataset, name=dest.name, shown=url)


def ensure_files(dataset="mnist", data_dir=None, download_missing=True, mirrors=None, log=sys.stderr):
    """Paths of the four files of ``dataset``, downloading the missing ones into the cache.

    With ``data_dir`` the files must already be there (nothing is downloaded).
    """
    if dataset not in CHECKSUMS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError(f"{folder}: data directory does not exist")
        download_missing = False
    else:
        folder = default_root() / dataset
    paths = {}
    for key, name in FILES.items():
        p = folder / name
        if not p.exists():
            if not download_missing:
                raise DataError(f"{p}: no such file (the folder must hold the four original "
                                f"{dataset} .gz files)")
            errors = []
            for base in (mirrors or MIRRORS[dataset]):
                if log is not None:
                    print(f"downloading {base}{name}", file=log)
                try:
                    download(base + name, p, dataset, log=log)
                    break
                except (urllib.error.URLError, OSError, DataError) as exc:
                    errors.append(f"{base}{name}: {exc}")
            else:
                raise DataError(f"{p}: could not download: " + "; ".join(errors) +
                                " (set RSO_NP_DATA or use --data-dir with a folder that holds the files)")
        paths[key] = p
    return paths


# --------------------------------------------------------------------------- dataset


NORMALIZATIONS = ("standardize", "center")


def load_dataset(dataset="mnist", data_dir=None, train_limit=None, test_limit=None, verify_checksums=True,
                 mirrors=None, log=sys.stderr, normalize="standardize"):
    """Load a dataset as a dict of NumPy arrays.

    Returns ``{"x_train", "y_train", "x_test", "y_test", "mean", "std"}``: images float32
    (N, 1, 28, 28), labels int64 (N,). ``normalize``: "standardize" (the paper, line 1 of Algorithm 1:
    pixels / 255 minus the full training set's mean, divided by its std) or "center" (the authors'
    code: pixels / 255 minus that mean, one scalar, no division; their code keeps these images in
    float16, about 1e-4 of a pixel coarser than the float32 here, which it does not copy).
    ``train_limit`` / ``test_limit`` keep the first that many examples (a deterministic subset).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    paths = ensure_files(dataset, data_dir, mirrors=mirrors, log=log)
    if verify_checksums:
        for p in paths.values():
            verify(p, dataset)
    raw = {k: read_idx(p, expect_ndim=3 if k.endswith("images") else 1) for k, p in paths.items()}
    for split in ("train", "test"):
        ni, nl = raw[f"{split}_images"].shape[0], raw[f"{split}_labels"].shape[0]
        if ni != nl:
            raise DataError(f"{paths[split + '_labels']}: {nl} labels for {ni} images in "
                            f"{paths[split + '_images']}")
    x_train = raw["train_images"].astype(np.float32) / 255.0
    mean, std = float(x_train.mean()), float(x_train.std())
    out = {"mean": mean, "std": std}
    for split, limit in (("train", train_limit), ("test", test_limit)):
        x = raw[f"{split}_images"]
        y = raw[f"{split}_labels"]
        if limit is not None:
            if limit < 1:
                raise ValueError(f"{split}_limit must be at least 1, got {limit}")
            x, y = x[:limit], y[:limit]
        xs = x.astype(np.float32) / np.float32(255.0) - np.float32(mean)
        if normalize == "standardize":
            xs = xs / np.float32(std)
        out[f"x_{split}"] = np.ascontiguousarray(xs[:, None, :, :], dtype=np.float32)
        out[f"y_{split}"] = y.astype(np.int64)
    return out
