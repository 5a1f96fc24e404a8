"""Atomic file writes: a temporary file beside the target, then a rename, so that a reader (or a run
that is stopped half-way) never sees a half-written file. And a lock that keeps a folder to one writer."""

import os
import signal
import tempfile
import threading
from contextlib import contextmanager

try:
    import fcntl
except ImportError:                  # Windows: no flock; folder_lock then locks nothing
    fcntl = None


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def stop_signals_deferred():
    """Hold Ctrl-C's SIGINT and SIGTERM while the block runs, then act on one that came in between.

    A Python signal handler raises its exception wherever the program happens to be. Inside
    ``tempfile.mkstemp``, after the file is made but before its name is returned, nobody could remove
    it. Here the handlers wait: a signal during the block is recorded, the handlers are put back, and
    the one recorded runs as the block ends. Only the main thread runs handlers (and may set them);
    elsewhere the block just runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    before = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum))
              for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):
            handler = before[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


@contextmanager
def atomic_path(path, suffix=""):
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``, on error (a stop
    signal included) it is removed.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path = os.fspath(path)
    tmp = None
    try:
        with stop_signals_deferred():          # the name is known before a stop can raise
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix,
                                       dir=os.path.dirname(os.path.abspath(path)))
            os.close(fd)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


class FolderBusy(OSError):
    """``folder_lock``: another process holds the folder; ``pid`` is the one it wrote down (None if unknown)."""

    def __init__(self, folder, pid):
        super().__init__(f"{folder} is held by another process" + (f" (pid {pid})" if pid else ""))
        self.folder, self.pid = folder, pid


@contextmanager
def folder_lock(folder, name=".lock"):
    """Hold ``folder`` for this process while the block runs: an exclusive ``flock`` on the file ``name``
    in it (created, with this process's pid written in it), which raises ``FolderBusy`` at once if
    another process (or another open file in this one) holds it. The file is removed when the block
    ends; if the process dies instead, the system releases the lock and the next holder takes the file
    over. Where ``fcntl`` does not exist (Windows) nothing is locked.

    A file is held only while it is still the one at the path: a process that opened the file just
    before the last holder removed it finds its lock on a file that is gone, and tries again."""
    if fcntl is None:
        yield
        return
    path = os.path.join(os.fspath(folder), name)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise FolderBusy(folder, int(text) if text.isdigit() else None) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)                                       # the last holder removed it: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(path)                                # while still held: no one else has it now
        finally:
            os.close(fd)
