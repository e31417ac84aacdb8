"""Integrity of saved registries, and fuzzing (issue #5, properties 4 and 5).

Every damaged registry must give a typed error that names the damaged file, never a registry that
answers differently. The fuzz test loads thousands of mutated registries in one subprocess under a
memory limit and per-case alarms (tests/registry_fuzz.py), so a crash, a hang or a memory blow-up
is caught and named too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fewshot.errors import RegistryFormatError
from fewshot.registry import FORMAT_VERSION, MANIFEST, Registry

from registry_child import initial_registry, snapshot

HERE = Path(__file__).resolve().parent
SCALE = int(os.environ.get("FEWSHOT_STRESS_FUZZ", "1"))  # `make stress`: 10x the flips and cuts
FUZZ_SECONDS = 600 * SCALE


@pytest.fixture
def two_generations(tmp_path):
    """A registry saved twice (generation 2 current), and a copy of its generation-1 files."""
    reg = initial_registry("flat-cosine-examples")
    path = tmp_path / "reg"
    reg.save(path)
    older = tmp_path / "older"
    shutil.copytree(path, older)
    reg.add("another", np.ones(8), sources=[("another.jpg", "a" * 64)])  # every file differs from generation 1
    reg.save(path)
    return path, older


def data_files(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if not n.startswith("."))


@pytest.mark.parametrize("damage", ["truncate", "flip", "other generation"])
def test_damaged_files_give_a_typed_error_naming_the_file(two_generations, damage):
    path, older = two_generations
    pristine = {n: (path / n).read_bytes() for n in data_files(path)}
    for name in pristine:
        target = path / name
        if damage == "truncate":
            for cut in (0, 1, len(pristine[name]) // 2, len(pristine[name]) - 1):
                target.write_bytes(pristine[name][:cut])
                with pytest.raises(RegistryFormatError, match=str(target)):
                    Registry.load(path)
        elif damage == "flip":
            for pos in (0, len(pristine[name]) // 3, len(pristine[name]) - 1):
                data = bytearray(pristine[name])
                data[pos] ^= 0x10
                target.write_bytes(bytes(data))
                with pytest.raises(RegistryFormatError, match=str(target)):
                    Registry.load(path)
        else:
            kind = name.split("-")[0]
            (older_name,) = [n for n in data_files(older) if n.split("-")[0] == kind]
            target.write_bytes((older / older_name).read_bytes())
            # an older manifest points at files that are gone: the error names the first of them
            expected = f"{path}/.*-000001.* referenced by the manifest but missing" if name == MANIFEST else str(target)
            with pytest.raises(RegistryFormatError, match=expected):
                Registry.load(path)
        target.write_bytes(pristine[name])
    assert Registry.load(path).classes[-1] == "another"


def test_a_flipped_bit_in_a_label_or_count_is_caught(two_generations):
    """The manifest checks itself: before format 3, "base-1" -> "base-0" or a count of 2 -> 3 loaded
    silently, and a query got the wrong class (or the wrong running mean later)."""
    path, _ = two_generations
    raw = (path / MANIFEST).read_bytes()
    for needle, replacement in ((b'"base-1"', b'"base-3"'), (b'"count": 2', b'"count": 3')):
        assert needle in raw
        (path / MANIFEST).write_bytes(raw.replace(needle, replacement, 1))
        with pytest.raises(RegistryFormatError, match=f"{path / MANIFEST}: checksum mismatch"):
            Registry.load(path)
    (path / MANIFEST).write_bytes(raw)


def test_newer_format_names_the_manifest_and_says_upgrade(two_generations):
    path, _ = two_generations
    m = json.loads((path / MANIFEST).read_bytes())
    m["format_version"] = FORMAT_VERSION + 1
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(RegistryFormatError, match=f"{path / MANIFEST}: written by a newer fewshot .*upgrade"):
        Registry.load(path)


def test_format_2_registries_without_a_checksum_still_load(two_generations):
    path, _ = two_generations
    before = snapshot(Registry.load(path))
    m = json.loads((path / MANIFEST).read_bytes())
    del m["manifest_sha256"]
    m["format_version"] = 2
    (path / MANIFEST).write_text(json.dumps(m))
    loaded = Registry.load(path)
    assert snapshot(loaded) == before
    loaded.save(path)  # saving upgrades it
    assert json.loads((path / MANIFEST).read_bytes())["format_version"] == FORMAT_VERSION


def test_a_fifo_or_device_where_a_file_should_be_does_not_hang(two_generations):
    path, _ = two_generations
    (name,) = [n for n in data_files(path) if n.startswith("prototypes")]
    (path / name).unlink()
    os.mkfifo(path / name)
    with pytest.raises(RegistryFormatError, match=f"{path / name}: not a regular file"):
        Registry.load(path)
    (path / name).unlink()
    (path / name).symlink_to("/dev/zero")
    with pytest.raises(RegistryFormatError, match=f"{path / name}: not a regular file"):
        Registry.load(path)


def test_fuzzed_registries_only_ever_raise_typed_errors(tmp_path):
    """Thousands of mutated registry directories, loaded in one subprocess with RLIMIT_AS = 3 GiB and
    a 20 s alarm per case: each must give a typed error naming the registry, or load a registry equal
    to the original (raw damage that does not matter, such as extra files) or, for deliberately
    resealed edits, a consistent registry."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TMPDIR": str(tmp_path)}
    args = ["0", str(60 * SCALE), str(60 * SCALE), "12"]  # seed, flips and cuts per file, values per field
    done = subprocess.run([sys.executable, str(HERE / "registry_fuzz.py"), *args],
                          capture_output=True, text=True, timeout=FUZZ_SECONDS, env=env)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    started = [line for line in lines if "start" in line]
    results = [line for line in lines if "case" in line]
    if done.returncode != 0 or not lines or not lines[-1].get("done"):
        last = started[-1] if started else None
        pytest.fail(f"the fuzz process died (status {done.returncode}) during case {last}:\n{done.stderr[-3000:]}")
    bad = []
    for r in results:
        if r["outcome"] == "typed":
            ok = r["names_dir"]
        elif r["outcome"] == "loaded":
            ok = r["sane"] and (r["equal"] or r["resealed"])
        else:
            ok = False
        if not ok:
            bad.append(f"{r['base']}: {r['what']}: {r.get('error')} {r.get('message', '')[:200]}")
    counts = Counter((r["resealed"], r["outcome"]) for r in results)
    print(f"\n{len(results)} fuzz cases: " + ", ".join(f"{'resealed' if k[0] else 'raw'} {k[1]}: {v}"
                                                 for k, v in sorted(counts.items())))
    assert len(results) >= 5000
    assert not bad, f"{len(bad)} bad outcomes, e.g.:\n" + "\n".join(bad[:20])
    raw_loaded = [r["what"] for r in results if r["outcome"] == "loaded" and not r["resealed"]]
    assert all("copy outside" in w or "extra junk" in w for w in raw_loaded), raw_loaded
