"""Registry fuzzing, run as ONE subprocess by tests/test_integrity_fuzz.py.

Builds a few small registries, then for each case writes a mutated copy (truncations, bit flips,
huge / negative / float / NaN numbers, deleted keys, wrong types, files from another generation,
symlinks to odd places, FIFOs) and loads it under a memory limit and a per-case alarm. Prints one
JSON line per case: what it was, and the outcome (a typed error with its message, or a load whose
registry is compared with the original). A crash, a hang (SIGALRM) or a memory blow-up kills the
process; the "start" line printed before each case names the culprit.

"Raw" mutations are what disks and careless copies do: the sha256 of each data file and the
manifest's own checksum must catch them all. "Resealed" mutations also fix those checksums, as a
deliberate editor could, so that the parsers behind them (manifest fields, .npy headers, the flat
FAISS index) are exercised: they must refuse bad content with typed errors too, or load something
consistent. Approximate FAISS indexes (IVF, HNSW) are only fuzzed raw: FAISS's own reader is not
hardened against crafted files (README: Durability and safety).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registry_child import DIM, import_registry_only, snapshot, sources_for  # noqa: E402

MEMORY_LIMIT = 3 * 2**30
CASE_SECONDS = 20
NUMBERS = [-1, 0, 1, 2**31, 2**53 + 1, 2**63, -(2**63) - 1, 10**30, 1.5, -1e308, 1e308, float("nan"),
           float("inf"), True, None, "7", [], {}]
STRINGS = ["", "\u0000", "x" * 5000, "../../etc/passwd", "/etc/passwd", "manifest.json", ".",
           "IVF999999999,Flat", "HNSW999999999", "PQ99999x16", "nonsense,,", "\ud800"]


# ---------------------------------------------------------------- the registries fuzzed

def build_bases(root: Path) -> dict:
    """{base name: (dir, {file name: bytes}, resealed index fuzzing allowed, older generation files)}."""
    import numpy as np

    registry = import_registry_only()
    g = np.random.default_rng(0)
    bases = {}

    def add(name, reg, flat):
        path = root / name
        reg.save(path)
        older = {n: (path / n).read_bytes() for n in os.listdir(path) if not n.startswith(".")}
        reg.add("one-more", g.normal(size=(2, DIM)), sources=sources_for("one-more", 2))
        reg.remove(reg.classes[0])
        reg.save(path)
        files = {n: (path / n).read_bytes() for n in os.listdir(path) if not n.startswith(".")}
        bases[name] = (path, files, flat, older)

    flat = registry.Registry(DIM, metric="cosine", index="Flat", store_examples=True, fingerprint={"name": "e"},
                             metadata={"note": "fuzz"})
    for i in range(6):
        vectors = g.normal(size=(int(g.integers(1, 4)), DIM))
        flat.add(f"class {i}/..", vectors, sources=sources_for(f"class {i}", len(vectors)) if i % 3 else None)
    add("flat-examples", flat, True)
    auto = registry.Registry(DIM, metric="l2")
    auto.add_many([f"a{i}" for i in range(7)], g.normal(size=(7, DIM)))
    add("auto-l2", auto, True)
    ivf = registry.Registry(DIM, metric="l2", index="IVF4,Flat")
    ivf.add_many([f"v{i}" for i in range(300)], g.normal(size=(300, DIM)))
    add("ivf", ivf, False)
    return bases


# ---------------------------------------------------------------- mutations

def seal(manifest: dict) -> bytes:
    """The manifest's checksum, as fewshot.registry.manifest.seal_manifest writes it (NaN allowed here, on purpose)."""
    body = json.dumps({k: v for k, v in manifest.items() if k != "manifest_sha256"}, indent=1).encode()
    return b'{"manifest_sha256": "%s",%s' % (hashlib.sha256(body).hexdigest().encode(), body[1:])


def resealed_file(files: dict, name: str, data: bytes) -> dict:
    """files with `name` replaced by data and the manifest's size and sha256 for it fixed up."""
    m = json.loads(files["manifest.json"])
    for entry in m["files"].values():
        if entry["name"] == name:
            entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    return {**files, name: data, "manifest.json": seal(m)}


def flip(data: bytes, rng: random.Random, bits: int) -> bytes:
    out = bytearray(data)
    for _ in range(bits):
        pos = rng.randrange(len(out))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def cut_points(n: int, count: int) -> list[int]:
    return sorted({0, 1, n // 2, n - 1} | {n * i // count for i in range(count)})


def leaves(obj, path=()):
    """(path, value) of every node of a JSON tree."""
    yield path, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield from leaves(value, path + (key,))


def replaced(obj, path, value, delete=False):
    obj = json.loads(json.dumps(obj))
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


def npy_header_variants(data: bytes) -> list[bytes]:
    """The .npy file with hostile headers: huge or negative shapes, other dtypes (object: pickle),
    Fortran order, a bad magic or version, a header length pointing past the file."""
    end = data.index(b"\n") + 1
    header, body = data[10:end].decode("latin1"), data[end:]

    def with_header(text):
        text = text.ljust(len(header) - 1)[:len(header) - 1] + "\n"
        return data[:10] + text.encode("latin1") + body

    variants = [with_header(header.replace("'shape': (", f"'shape': ({big}, ")) for big in
                (2**62, -1, 10**40, 0)]
    variants += [with_header(header.replace("'<f4'", d).replace("'<i8'", d)) for d in
                 ("'|O'", "'<f8'", "'>f4'", "'<f2'", "'|V4'", "'<U2'")]
    variants += [with_header(header.replace("False", "True")), with_header("{" * 40),
                 with_header("__import__('os').system('touch pwned')"), with_header("")]
    variants += [b"\x93NUMPY\x03\x00" + data[8:], b"\x93NUMPX" + data[6:],
                 data[:8] + b"\xff\xff" + data[10:], data[:8] + b"\x00\x00" + data[10:]]
    return variants


def provenance_variants(data: bytes) -> list[bytes]:
    """The provenance file with well-formed JSON that lies: wrong counts, unknown or repeated class
    ids, bad digests and names, wrong types, deep nesting."""
    table = json.loads(data)
    variants = [{}, [], {"classes": {}}, {"classes": [1]}, {"classes": [{"id": 10**6, "sources": []}]}]
    if table["classes"]:
        first = table["classes"][0]
        pair, n = first["sources"][0], len(first["sources"])
        for bad in ([*first["sources"], pair], first["sources"][1:], [[pair[0], "g" * 64]] * n,
                    [[pair[0], pair[1].upper()]] * n, [["x" * 5000, None]] * n, [[1, None]] * n, [[None]] * n,
                    ["ab"] * n, None, "x"):
            variants.append({"classes": [{**first, "sources": bad}, *table["classes"][1:]]})
        variants += [{"classes": [first, first]}, {"classes": [{**first, "id": -1}]},
                     {"classes": [{**first, "id": True}]}]
    raw = [json.dumps(v).encode() for v in variants]
    return raw + [b"[" * 100000, b"\xff\xfe", b'{"classes": NaN}']


def cases(bases: dict, seed: int, flips_per_file: int, cuts_per_file: int, values_per_field: int):
    """Yield (case id, base, description, resealed?, files after the mutation)."""
    rng = random.Random(seed)
    n = 0
    for base, (_, files, flat, older) in bases.items():
        def case(what, resealed, mutated):
            nonlocal n
            n += 1
            return f"{n}", base, what, resealed, mutated

        names = sorted(files)
        manifest_bytes = files["manifest.json"]
        positions = range(len(manifest_bytes))
        for pos in positions if len(positions) <= 2000 else sorted(rng.sample(positions, 2000)):
            # one flipped bit in each byte of the manifest (in 2000 of them for a big one)
            mutated = bytearray(manifest_bytes)
            mutated[pos] ^= 1 << rng.randrange(8)
            yield case(f"manifest.json bit flip at byte {pos}", False, {**files, "manifest.json": bytes(mutated)})
        for name in names:  # raw truncations and bit flips of every file
            for cut in cut_points(len(files[name]), cuts_per_file):
                yield case(f"truncate {name} at {cut}", False, {**files, name: files[name][:cut]})
            for i in range(flips_per_file):
                yield case(f"flip bits in {name} #{i}", False, {**files, name: flip(files[name], rng, 1 + i % 3)})
            yield case(f"delete {name}", False, {k: v for k, v in files.items() if k != name})
            yield case(f"append to {name}", False, {**files, name: files[name] + b"\0"})
        for name in names:  # files of the other generation swapped in under this one's names
            kind = name.split("-")[0]
            for other, data in older.items():
                if other.split("-")[0] == kind and other != name and data != files[name]:  # (same bytes: no damage)
                    yield case(f"{other} (older generation) as {name}", False, {**files, name: data})
        yield case("older manifest.json (its files are gone)", False,
                   {**files, "manifest.json": older["manifest.json"]})
        for name in names:  # odd things where a file should be
            for what, thing in (("symlink to a copy outside", ("copy", name)),
                                ("symlink to /dev/zero", ("link", "/dev/zero")),
                                ("symlink to /dev/urandom", ("link", "/dev/urandom")),
                                ("symlink to /etc/passwd", ("link", "/etc/passwd")), ("FIFO", ("fifo",)),
                                ("directory", ("dir",)), ("dangling symlink", ("link", "/nonexistent/x")),
                                ("symlink loop", ("link", name))):
                yield case(f"{name} is a {what}", False, {**files, name: thing})
        yield case("empty directory", False, {})
        yield case("extra junk files", False, {**files, "notes.txt": b"hello", "index-999999.faiss": b"x"})
        yield case("manifest is deeply nested JSON", False, {**files, "manifest.json": b"[" * 100000})
        yield case("manifest is a pickle", False, {**files, "manifest.json": b"\x80\x04cos\nsystem\n."})

        manifest = json.loads(files["manifest.json"])
        for path, value in leaves(manifest):  # resealed: every field with bad values, or deleted
            if not path or path == ("manifest_sha256",) or (path[0] == "classes" and len(path) > 1 and path[1] > 1):
                continue  # (the first two classes stand for all)
            label = "/".join(map(str, path))
            yield case(f"manifest {label} deleted", True,
                       {**files, "manifest.json": seal(replaced(manifest, path, None, delete=True))})
            pool = NUMBERS + (STRINGS if isinstance(value, str) else [])
            for bad in rng.sample(pool, min(len(pool), values_per_field)):
                if bad == value and type(bad) is type(value):
                    continue
                yield case(f"manifest {label} = {bad!r:.40}", True,
                           {**files, "manifest.json": seal(replaced(manifest, path, bad))})
        newer = import_registry_only().FORMAT_VERSION + 1
        yield case(f"manifest format_version {newer} (newer)", False,
                   {**files, "manifest.json": seal({**manifest, "format_version": newer})})
        provenance = next(name for name in names if name.startswith("provenance-"))
        for i, variant in enumerate(provenance_variants(files[provenance])):
            yield case(f"resealed {provenance} variant {i}", True, resealed_file(files, provenance, variant))
        for name in names:  # resealed data files: the parsers behind the checksums
            if name == "manifest.json" or (name.startswith("index") and not flat):
                continue
            data = files[name]
            if name.endswith(".npy"):
                for i, variant in enumerate(npy_header_variants(data)):
                    yield case(f"resealed {name} header variant {i}", True, resealed_file(files, name, variant))
            for cut in cut_points(len(data), cuts_per_file // 2):
                yield case(f"resealed {name} truncated at {cut}", True, resealed_file(files, name, data[:cut]))
            for i in range(flips_per_file):
                yield case(f"resealed {name} bit flips #{i}", True,
                           resealed_file(files, name, flip(data, rng, 1 + i % 3)))


# ---------------------------------------------------------------- running one case

def materialise(path: Path, files: dict, source: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    for name, content in files.items():
        target = path / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        elif content[0] == "copy":
            outside = path.parent / f"outside-{name}"
            shutil.copy(source / content[1], outside)
            target.symlink_to(outside)
        elif content[0] == "link":
            target.symlink_to(content[1] if content[1].startswith("/") else path / content[1])
        elif content[0] == "fifo":
            os.mkfifo(target)
        elif content[0] == "dir":
            target.mkdir()


def is_sane(reg) -> bool:
    """A registry that loaded from deliberately edited (resealed) files must still be consistent:
    finite prototypes, and each answer exactly what its prototypes say (the right classes, the right
    scores), never an index that disagrees with them."""
    import numpy as np

    if not len(reg):
        return True
    labels, protos = reg.prototypes()
    if not np.isfinite(protos).all():
        return False
    queries = np.random.default_rng(5).normal(size=(4, reg.dim)).astype(np.float32)
    k = min(3, len(reg))
    found = reg.search(queries, k)
    q, p = queries.astype(np.float64), protos.astype(np.float64)
    if reg.metric == "cosine":
        exact = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ p.T
    else:
        exact = -((q[:, None, :] - p[None]) ** 2).sum(-1)
    got = np.array([[exact[i, labels.index(lb)] for lb in row] for i, row in enumerate(found.labels)])
    scale = 1e-4 * max(1.0, float(np.abs(exact).max()))
    if got.shape != found.scores.shape or not np.allclose(found.scores, got, atol=scale):
        return False  # a score that is not the score of the class it is reported for
    # an exact index must also find the best classes (an approximate one may miss some)
    return reg.index_in_use != "Flat" or np.allclose(got, -np.sort(-exact, axis=1)[:, :k], atol=scale)


def run(seed: int, flips_per_file: int, cuts_per_file: int, values_per_field: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    registry = import_registry_only()
    from fewshot.errors import FewShotError

    root = Path(tempfile.mkdtemp(prefix="fewshot-fuzz-"))
    bases = build_bases(root)
    originals = {name: snapshot(registry.Registry.load(path)) for name, (path, *_) in bases.items()}
    scratch = root / "case"
    for case_id, base, what, resealed, files in cases(bases, seed, flips_per_file, cuts_per_file, values_per_field):
        print(json.dumps({"start": case_id, "what": what}), flush=True)
        materialise(scratch, files, bases[base][0])
        signal.alarm(CASE_SECONDS)  # default action: the process dies, and the parent names this case
        out = {"case": case_id, "base": base, "what": what, "resealed": resealed}
        try:
            reg = registry.Registry.load(scratch)
            out.update(outcome="loaded", equal=snapshot(reg) == originals[base], sane=is_sane(reg))
        except FewShotError as e:
            out.update(outcome="typed", error=type(e).__name__, message=str(e), names_dir=str(scratch) in str(e))
        except BaseException as e:  # noqa: BLE001 - the test fails on these, with the case named
            out.update(outcome="untyped", error=type(e).__name__, message=str(e)[:500])
        signal.alarm(0)
        print(json.dumps(out), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    run(*map(int, sys.argv[1:5]))
