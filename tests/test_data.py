"""The IDX loader on files the tests write, and the download path against a local HTTP server."""

import gzip
import hashlib
import http.server
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from rso_np import data
from rso_np.data import DataError, load_dataset, read_idx

from .conftest import mnist_dir


def idx_bytes(arr, code=0x08):
    arr = np.asarray(arr)
    return struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + \
        arr.astype(">u1" if code == 0x08 else ">i4").tobytes()


def write_set(folder, n_train=20, n_test=10, seed=0, gz=True):
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    content = {
        "train-images-idx3-ubyte.gz": idx_bytes(rng.integers(0, 256, (n_train, 28, 28))),
        "train-labels-idx1-ubyte.gz": idx_bytes(rng.integers(0, 10, n_train)),
        "t10k-images-idx3-ubyte.gz": idx_bytes(rng.integers(0, 256, (n_test, 28, 28))),
        "t10k-labels-idx1-ubyte.gz": idx_bytes(rng.integers(0, 10, n_test)),
    }
    for name, raw in content.items():
        (folder / name).write_bytes(gzip.compress(raw) if gz else raw)
    return folder


def fake_checksums(folder, monkeypatch, dataset="mnist"):
    sums = {}
    for p in Path(folder).iterdir():
        b = p.read_bytes()
        sums[p.name] = (hashlib.md5(b).hexdigest(), hashlib.sha256(b).hexdigest())
    monkeypatch.setitem(data.CHECKSUMS, dataset, sums)


def test_read_idx_plain_and_gz(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(a))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(a)))
    assert np.array_equal(read_idx(tmp_path / "a.idx"), a)
    assert np.array_equal(read_idx(tmp_path / "a.idx.gz", expect_ndim=3), a)
    b = np.array([1, -2, 300], dtype=np.int32)
    (tmp_path / "b.idx").write_bytes(idx_bytes(b, code=0x0C))
    assert read_idx(tmp_path / "b.idx").tolist() == [1, -2, 300]


@pytest.mark.parametrize("mutate,match", [
    (lambda r: b"\x00\x01" + r[2:], "bad IDX magic number 0x00010803"),
    (lambda r: r[:2] + b"\x07" + r[3:], "bad IDX magic number"),
    (lambda r: r[:-5], "truncated or wrong count"),
    (lambda r: r + b"\x00", "truncated or wrong count"),
    (lambda r: r[:6], "truncated IDX header"),
    (lambda r: r[:4] + struct.pack(">I", 3) + r[8:], "IDX header says"),
])
def test_read_idx_corrupt(tmp_path, mutate, match):
    raw = idx_bytes(np.zeros((2, 3, 4), np.uint8))
    p = tmp_path / "bad.idx"
    p.write_bytes(mutate(raw))
    with pytest.raises(DataError, match=match) as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_read_idx_wrong_ndim_and_bad_gzip(tmp_path):
    p = tmp_path / "x.idx"
    p.write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match="has 1 dimension.*expected 3"):
        read_idx(p, expect_ndim=3)
    g = tmp_path / "x.idx.gz"
    g.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 50), np.uint8)))[:30])
    with pytest.raises(DataError, match=f"{g}: cannot read .*corrupt or truncated"):
        read_idx(g)
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "missing.idx")


def test_load_dataset_normalises_and_limits(tmp_path, monkeypatch):
    folder = write_set(tmp_path / "mnist")
    fake_checksums(folder, monkeypatch)
    d = load_dataset("mnist", data_dir=folder, train_limit=7, test_limit=3, log=None)
    assert d["x_train"].shape == (7, 1, 28, 28) and d["x_train"].dtype == np.float32
    assert d["y_train"].dtype == np.int64 and d["x_test"].shape == (3, 1, 28, 28)
    full = load_dataset("mnist", data_dir=folder, log=None)
    assert abs(full["x_train"].mean()) < 1e-5 and abs(full["x_train"].std() - 1) < 1e-4
    assert np.array_equal(full["x_train"][:7], d["x_train"]), "the subset is the first N, same normalisation"


def test_label_count_mismatch(tmp_path, monkeypatch):
    folder = write_set(tmp_path / "mnist")
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(9, np.uint8))))
    fake_checksums(folder, monkeypatch)
    with pytest.raises(DataError, match="9 labels for 10 images"):
        load_dataset("mnist", data_dir=folder, log=None)


def test_checksum_mismatch_and_missing(tmp_path):
    folder = write_set(tmp_path / "mnist")      # not the real files: checksums differ
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("mnist", data_dir=folder, log=None)
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: no such file"):
        load_dataset("mnist", data_dir=folder, log=None)
    with pytest.raises(DataError, match="data directory does not exist"):
        load_dataset("mnist", data_dir=tmp_path / "nope", log=None)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: _Quiet(*a, directory=str(root), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_good_files(tmp_path, monkeypatch, http_root):
    root, url = http_root
    src = write_set(root / "good")
    fake_checksums(src, monkeypatch)
    monkeypatch.setenv("RSO_NP_DATA", str(tmp_path / "cache"))
    d = load_dataset("mnist", mirrors=[url + "missing/", url + "good/"], log=None)
    assert d["x_train"].shape == (20, 1, 28, 28)
    cached = sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir())
    assert cached == sorted(data.FILES.values()), "only the four files, no temporary leftovers"


def test_download_bad_files_rejected(tmp_path, monkeypatch, http_root):
    root, url = http_root
    good = write_set(root / "good")
    fake_checksums(good, monkeypatch)
    write_set(root / "bad", seed=9)             # same names, other bytes
    monkeypatch.setenv("RSO_NP_DATA", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="could not download.*checksum mismatch"):
        load_dataset("mnist", mirrors=[url + "bad/"], log=None)
    folder = tmp_path / "cache" / "mnist"
    assert not folder.exists() or list(folder.iterdir()) == [], "nothing half-written left behind"
    # a bad mirror first, a good one second: the good one is used
    d = load_dataset("mnist", mirrors=[url + "bad/", url + "good/"], log=None)
    assert d["y_test"].shape == (10,)


def test_real_mnist_verifies():
    folder = mnist_dir("mnist")
    if folder is None:
        pytest.skip("real MNIST files not found ($RSO_NP_DATA or ../shared/data)")
    d = load_dataset("mnist", data_dir=folder, train_limit=100, test_limit=100, log=None)
    assert d["mean"] == pytest.approx(0.1307, abs=1e-4) and d["std"] == pytest.approx(0.3081, abs=1e-4)
    assert d["y_test"][:5].tolist() == [7, 2, 1, 0, 4]
