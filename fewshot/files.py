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
