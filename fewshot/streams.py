"""Keep what libraries print below Python (torch's C++ exporter, Ray's core) off the user's stdout and stderr.

Redirecting ``sys.stdout`` is not enough for them: they write to file descriptors 1 and 2 directly.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Iterator

_descriptors_lock = threading.Lock()  # descriptors are process-wide: one redirection at a time


@contextlib.contextmanager
def descriptor_silenced(fd: int, *, keep_python_stream: bool = False) -> Iterator[None]:
    """Point file descriptor ``fd`` (1: stdout, 2: stderr) at /dev/null while the block runs.

    ``keep_python_stream``: Python's own stream for it (``sys.stdout`` / ``sys.stderr``: fewshot's progress bar
    and messages) keeps writing to the real descriptor through a copy of it; otherwise it is silenced too."""
    name = {1: "stdout", 2: "stderr"}[fd]
    with _descriptors_lock:
        try:
            saved = os.dup(fd)
        except OSError:  # no such descriptor: nothing to protect
            yield
            return
        stream = getattr(sys, name)
        rebind = keep_python_stream and _writes_to(stream, fd)
        if rebind:
            setattr(sys, name, open(saved, "w", buffering=1, encoding=stream.encoding, errors="backslashreplace",
                                    closefd=False))
        _flush(stream)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
        try:
            yield
        finally:
            if rebind:
                getattr(sys, name).close()  # flushes; the copied descriptor stays open (closefd=False)
                setattr(sys, name, stream)
            else:
                _flush(stream)  # the block's Python-level writes go where the library's went
            os.dup2(saved, fd)
            os.close(saved)


def _writes_to(stream, fd: int) -> bool:
    """Whether ``stream`` is a file on descriptor ``fd`` (pytest's capture or a notebook's stream is not)."""
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


def _flush(stream) -> None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        stream.flush()
