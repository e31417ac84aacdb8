"""The writer lock file of a registry (fewshot.registry.locking): it must never be a way to write outside the
registry."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fewshot.errors import RegistryFormatError
from fewshot.registry.locking import LOCK_FILE, WriterLock
from fewshot.registry import Registry

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX files")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


@pytest.mark.parametrize("operation", ["open", "save"])
def test_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path, operation):
    victim = tmp_path / "precious.txt"
    victim.write_text("do not truncate me\n")
    missing = tmp_path / "created-by-fewshot"
    for target, name in ((victim, "existing"), (missing, "dangling")):
        reg_dir = tmp_path / f"reg-{name}"
        reg_dir.mkdir()
        os.symlink(target, reg_dir / LOCK_FILE)
        with pytest.raises(RegistryFormatError, match="regular file"):
            if operation == "open":
                Registry.open(reg_dir, dim=4)
            else:
                reg = Registry(4)
                reg.add("a", np.ones((1, 4), np.float32))
                reg.save(reg_dir)
    assert victim.read_text() == "do not truncate me\n"
    assert not missing.exists()


def test_hard_linked_lock_file_is_refused(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep\n")
    reg_dir = tmp_path / "reg"
    reg_dir.mkdir()
    os.link(victim, reg_dir / LOCK_FILE)
    with pytest.raises(RegistryFormatError, match="regular file"):
        WriterLock(reg_dir)
    assert victim.read_text() == "keep\n"


def test_fifo_lock_file_is_refused_without_leaking_a_descriptor(tmp_path):
    reg_dir = tmp_path / "reg"
    reg_dir.mkdir()
    os.mkfifo(reg_dir / LOCK_FILE)
    before = open_fds()
    for _ in range(3):
        with pytest.raises(RegistryFormatError, match="regular file"):
            Registry.open(reg_dir, dim=4)
    assert open_fds() == before
    os.unlink(reg_dir / LOCK_FILE)  # once it is a plain file again, this process may write
    with Registry.open(reg_dir, dim=4) as reg:
        reg.add("a", np.ones((1, 4), np.float32))
    assert Registry.load(reg_dir).classes == ["a"]


def test_symlinked_readers_lock_is_refused_by_readers_and_writers(tmp_path):
    from fewshot.errors import RegistrySaveError
    from fewshot.registry.locking import READERS_LOCK_FILE

    victim = tmp_path / "precious.txt"
    victim.write_text("keep\n")
    reg = Registry(4)
    reg.add("a", np.ones((1, 4), np.float32))
    reg.save(tmp_path / "reg")
    os.unlink(tmp_path / "reg" / READERS_LOCK_FILE)
    os.symlink(victim, tmp_path / "reg" / READERS_LOCK_FILE)
    with pytest.raises(RegistryFormatError, match="regular file"):
        Registry.load(tmp_path / "reg")
    with pytest.raises(RegistrySaveError, match="regular file"):
        reg.save(tmp_path / "reg")
    assert victim.read_text() == "keep\n"


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_lock_files_get_the_mode_the_umask_gives_the_other_registry_files(tmp_path, umask):
    from fewshot.registry.locking import READERS_LOCK_FILE

    old = os.umask(umask)
    try:
        with Registry.open(tmp_path / "reg", 4) as reg:
            reg.add("a", np.ones((1, 4)))
    finally:
        os.umask(old)
    expected = 0o666 & ~umask  # what a plain open() gives, as every registry file gets
    modes = {name: os.stat(tmp_path / "reg" / name).st_mode & 0o777
             for name in (LOCK_FILE, READERS_LOCK_FILE, "manifest.json")}
    assert modes == dict.fromkeys(modes, expected)


def test_a_new_registry_folder_is_removed_when_nothing_was_saved_in_it(tmp_path):
    path = tmp_path / "parent" / "reg"
    with pytest.raises(KeyboardInterrupt):
        with Registry.open(path, 4) as reg:
            assert (path / LOCK_FILE).is_file()  # held while open
            with reg.batch():
                reg.add("a", np.ones((1, 4)))
                raise KeyboardInterrupt  # Ctrl-C before the first save
    assert not (tmp_path / "parent").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made stays, lock file and all
    Registry.open(tmp_path / "mine", 4).close()
    assert (tmp_path / "mine").is_dir()
    with Registry.open(path, 4) as reg:  # a registry that saved something stays
        reg.add("a", np.ones((1, 4)))
    assert Registry.load(path).classes == ["a"]
