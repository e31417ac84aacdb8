"""Opening files that may be hostile: a FIFO named ``x.jpg`` or ``prototypes-000001.npy`` would block a
reader forever, and ``/dev/zero`` would feed it forever, so only regular files are read."""

from __future__ import annotations

import os
import stat
from typing import BinaryIO


def open_regular(path) -> BinaryIO | None:
    """``path`` opened for binary reading if it is a regular file (symlinks followed), else None.

    The open itself never blocks (O_NONBLOCK), so a FIFO is seen and refused, not waited on.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        return None
    return f


def current_umask() -> int:
    """The process's umask, read without changing it where the platform allows (Linux), since setting
    it to read it back races with other threads creating files."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path, *, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open`` / ``mkdir`` would have (0666 / 0777 less the umask):
    ``tempfile.mkstemp`` / ``mkdtemp`` make 0600 / 0700 whatever the umask, which would keep a registry
    or head that one user saves unreadable to the others it is shared with."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())
