"""``_io.folder_lock``: one process at a time in a run folder, across processes, and free again when the
holder ends or dies."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

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
