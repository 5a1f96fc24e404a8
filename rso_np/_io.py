"""Atomic file writes: a temporary file beside the target, then a rename, so that a reader (or a run
that is stopped half-way) never sees a half-written file."""

import os
import tempfile
from contextlib import contextmanager


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path, suffix=""):
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``, on error it is removed.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
