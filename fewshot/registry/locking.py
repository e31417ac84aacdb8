"""The writer lock of a registry directory: one writer at a time, readers never wait.

An exclusive ``flock`` on ``<registry>/.fewshot-writer.lock``, held for as long as a registry is open
for writing (``Registry.open``, ``FewShotClassifier.open``, the CLI's register / remove / rename) and
during every ``save``. The kernel drops the lock when its holder dies, so a crash or a SIGKILL never
leaves a stale lock. The file is deleted only with the folder of a new registry in which nothing was
saved, by its holder before letting go; a writer that gets the lock of a deleted file notices (the
path no longer names it) and is refused, so two writers never both hold it. On platforms without
``fcntl`` there is no lock.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import RegistryFormatError, RegistryLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = ".fewshot-writer.lock"
# Readers hold a shared lock on this file while they read the manifest and open the data files it
# names; a writer deletes old generations only under an exclusive lock on it (never waiting for it),
# so a reader always gets every file of the generation it read, however big and however often saved.
READERS_LOCK_FILE = ".fewshot-readers.lock"


class WriterLock:
    """Hold ``directory``'s writer lock (the directory must exist) until ``release()``.

    Raises ``RegistryLockedError`` at once, naming the holder, if another writer has it; a second
    ``WriterLock`` on the same directory in the same process is refused too.
    """

    def __init__(self, directory: str | os.PathLike, *, on_release: Callable[[], None] | None = None):
        self.directory = Path(directory)
        self._fd = None
        self._on_release = on_release  # runs while the lock is still held (e.g. removing an unsaved folder)
        if fcntl is None:
            return
        fd = open_lock_file(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _still_linked(fd, self.directory / LOCK_FILE):  # its holder removed it before letting go
                raise BlockingIOError
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
        on_release, self._on_release = self._on_release, None
        if on_release is not None and self.held:
            on_release()
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor of the open file drops the flock
            self._fd = None

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


@contextlib.contextmanager
def reader_pin(directory: str | os.PathLike) -> Iterator[None]:
    """Within this block, no writer removes a generation's files (readers share this lock; nothing
    to hold where the registry has no readers' lock file yet, or the platform has no ``fcntl``)."""
    fd = None
    if fcntl is not None:
        try:
            fd = open_lock_file(Path(directory) / READERS_LOCK_FILE, os.O_RDONLY)
        except (FileNotFoundError, PermissionError):
            pass  # saved by an older fewshot, or another user's file we may not open: readers retry instead
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)  # a writer holds it exclusively only while it unlinks files
        yield
    finally:
        if fd is not None:
            os.close(fd)


def create_readers_lock(directory: str | os.PathLike) -> None:
    """Make sure ``directory`` has the readers' lock file (writers call this before saving)."""
    if fcntl is not None:
        os.close(open_lock_file(Path(directory) / READERS_LOCK_FILE, os.O_RDONLY | os.O_CREAT))


@contextlib.contextmanager
def no_readers(directory: str | os.PathLike) -> Iterator[bool]:
    """Yield True while no reader is between reading the manifest and opening its files (and none can
    start), False if some are: then the caller must leave every generation's files in place."""
    if fcntl is None:
        yield True  # no way to know: readers retry instead
        return
    fd = open_lock_file(Path(directory) / READERS_LOCK_FILE, os.O_RDONLY | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def open_lock_file(path: Path, flags: int) -> int:
    """A descriptor of the lock file ``path``, which must be a regular file of its own.

    A registry unpacked from an archive or kept in a shared folder may hold a symlink, a hard link to
    someone's file, or a FIFO under the lock file's name; writing a PID into it would truncate a file
    outside the registry, and a FIFO would block. Symlinks are not followed, the open never blocks,
    and anything but a singly-linked regular file is refused with ``RegistryFormatError``.
    """
    refused = RegistryFormatError(f"{path} is not a regular file (a symlink, hard link, FIFO or device); "
                                  "the registry may have been tampered with: delete that entry, then try again")
    try:
        # 0666 less the umask, like every other registry file: a group-shared registry stays shareable
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK, errno.ENXIO, errno.EISDIR):
            raise refused from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise refused
    return fd


def _still_linked(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path``: a writer that created a registry folder and saved
    nothing removes its lock file (holding it) on the way out, and a lock on that removed file locks
    nothing."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _holder(fd: int) -> str:
    try:
        pid = int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return "another process"
    if pid == os.getpid():
        return (f"this process (pid {pid}: another Registry.open / FewShotClassifier.open of it is still "
                "open; close() it first)")
    return f"process {pid}"
