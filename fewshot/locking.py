"""The writer lock of a registry directory: one writer at a time, readers never wait.

An exclusive ``flock`` on ``<registry>/.fewshot-writer.lock``, held for as long as a registry is open
for writing (``Registry.open``, ``FewShotClassifier.open``, the CLI's register / remove / rename) and
during every ``save``. The kernel drops the lock when its holder dies, so a crash or a SIGKILL never
leaves a stale lock. The file itself is never deleted: a writer that deleted it while another process
had it open would let two writers in at once. On platforms without ``fcntl`` there is no lock.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import RegistryLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = ".fewshot-writer.lock"


class WriterLock:
    """Hold ``directory``'s writer lock (the directory must exist) until ``release()``.

    Raises ``RegistryLockedError`` at once, naming the holder, if another writer has it; a second
    ``WriterLock`` on the same directory in the same process is refused too.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._fd = None
        if fcntl is None:
            return
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RegistryLockedError(
                f"{self.directory} is open for writing by {holder}; wait for it to finish or close it, "
                "then try again (reading, e.g. predict, needs no lock; a killed writer's lock is released "
                "automatically)") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # who holds it, for the message above
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None or fcntl is None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor of the open file drops the flock
            self._fd = None

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


def _holder(fd: int) -> str:
    try:
        pid = int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return "another process"
    if pid == os.getpid():
        return (f"this process (pid {pid}: another Registry.open / FewShotClassifier.open of it is still "
                "open; close() it first)")
    return f"process {pid}"
