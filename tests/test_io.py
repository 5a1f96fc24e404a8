"""``_io.folder_lock``: one process at a time in a run folder, across processes, and free again when the
holder ends or dies. ``_io.atomic_path``: a stop signal leaves no temporary file."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest

from rso_np import _io
from rso_np._io import FolderBusy, folder_lock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="folder_lock locks nothing without fcntl")

HOLD = textwrap.dedent("""
    import sys
    from rso_np._io import folder_lock
    with folder_lock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()                 # until the test closes our stdin (or kills us)
""")


def holder(folder):
    """A child process holding ``folder`` (returns once it holds it)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_another_process_holding_the_folder_is_named(tmp_path):
    p = holder(tmp_path)
    try:
        with pytest.raises(FolderBusy) as exc:
            with folder_lock(tmp_path):
                pytest.fail("the folder is held by the child")
        assert exc.value.pid == p.pid
        assert f"(pid {p.pid})" in str(exc.value)
    finally:
        p.stdin.close()
        assert p.wait(timeout=30) == 0
    assert not (tmp_path / ".lock").exists(), "the holder removes the file when its block ends"
    with folder_lock(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    assert list(tmp_path.iterdir()) == []


def test_a_holder_that_dies_frees_the_folder(tmp_path):
    p = holder(tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    p.stdin.close()
    p.stdout.close()
    assert (tmp_path / ".lock").exists(), "a killed holder leaves its file behind"
    with folder_lock(tmp_path):                  # ... but not its lock
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


def test_the_same_process_twice_is_refused_and_the_block_runs_once(tmp_path):
    ran = []
    with folder_lock(tmp_path):
        with pytest.raises(FolderBusy):
            with folder_lock(tmp_path):
                ran.append("inner")
        ran.append("outer")
    assert ran == ["outer"]


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signum)


def test_a_stop_signal_while_the_temporary_file_is_made_leaves_no_file(tmp_path, monkeypatch):
    """SIGTERM handled inside ``mkstemp``, after the file exists and before its name is returned (where
    ``kill PID`` once left a ``.tmp-*`` file in a run folder): the write stops with the handler's
    exception, the target keeps its old text, no temporary file is left and the handler is back."""
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        made = real_mkstemp(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)    # the handler runs here, the file made, its name not returned
        return made

    monkeypatch.setattr(_io.tempfile, "mkstemp", mkstemp)
    target = tmp_path / "history.json"
    target.write_text("before")
    before = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with pytest.raises(_Stop):
            _io.atomic_write_text(target, "after")
        assert signal.getsignal(signal.SIGTERM) is _raise_stop
    finally:
        signal.signal(signal.SIGTERM, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"], "no temporary file is left"
    assert target.read_text() == "before"


def test_a_stop_signal_while_writing_leaves_no_file(tmp_path):
    """A stop in the middle of the write (the handler's exception out of the block) removes the file."""
    target = tmp_path / "checkpoint.npz"
    before = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with pytest.raises(_Stop), _io.atomic_path(target, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert list(tmp_path.iterdir()) == []
