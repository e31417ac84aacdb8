"""Image datasets laid out as folders of classes (optionally grouped), read from a folder or a zip.

Two layouts, the ones few-shot benchmarks ship in:

* flat:    ``<class>/<image>``                 (Caltech-101, any "one folder per class" photo set)
* grouped: ``<group>/<class>/<image>``         (Omniglot: alphabet/character)

``load_dataset`` lists the images and returns an ``ImageDataset``: items for the encoder (paths, or the
bytes of zip members), stable names for manifests, integer labels and groups. Nothing is decoded here.
Everything is sorted, so the same data gives the same indices on every machine; the seeded
``split_by_group`` / ``split_by_class`` then give the same splits everywhere.
"""

from __future__ import annotations

import io
import numbers
import os
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..embedding.images import IMAGE_EXTENSIONS, NamedBytes, describe, expand_inputs, load_image
from ..errors import ImageError

if TYPE_CHECKING:
    from ..embedding.cache import EmbeddingCache
    from ..embedding.model import Encoder

LAYOUTS = ("auto", "flat", "grouped")
_DEPTH = {"flat": 1, "grouped": 2}  # folder levels between the root and an image
_EXPECTED = ("expected '<class>/<image>' (layout='flat') or '<group>/<class>/<image>' (layout='grouped'), "
             "e.g. 'cat/001.jpg' or 'Arcadian/character01/0001_01.png'")
_JUNK_DIRS = frozenset({"__MACOSX"})  # resource forks that macOS zips carry beside the real files
# Zip members are read into memory, so a member must look like an image file before it is: at most
# 256 MiB (an uncompressed RGB image at Pillow's bomb limit is ~268 MB) and, above 1 MiB, compressed
# at most 100:1 (photos and PNGs barely compress further; a zip bomb reaches ~1000:1).
MAX_ZIP_MEMBER_BYTES = 256 * 2**20
MAX_ZIP_RATIO = 100


@dataclass(frozen=True)
class ImageDataset:
    """Images with class labels (and groups, for nested layouts); index ``i`` describes one image."""

    items: list  # str path (folders) or NamedBytes "<zip>:<member>" (zips): what the encoder reads
    names: list[str]  # path relative to the dataset root, "/"-separated: what manifests store
    labels: np.ndarray  # (N,) int64 index into classes
    classes: list[str]  # "class", or "group/class" for grouped datasets
    groups: np.ndarray | None  # (N,) int64 index into group_names; None for flat datasets
    group_names: list[str] | None
    source: str  # the folder or zip it came from

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        groups = f", {len(self.group_names)} groups" if self.group_names is not None else ""
        return f"ImageDataset({self.source!r}: {len(self)} images, {len(self.classes)} classes{groups})"

    @property
    def class_groups(self) -> np.ndarray | None:
        """(C,) group index of each class, or None for flat datasets."""
        if self.groups is None:
            return None
        out = np.full(len(self.classes), -1, dtype=np.int64)
        out[self.labels] = self.groups  # a class lies in exactly one group (enforced by the layout)
        return out

    def select_classes(self, classes: Iterable[str | int]) -> ImageDataset:
        """The images of the given classes (names or indices), relabelled 0..k-1 in this dataset's order."""
        keep = _resolve(classes, self.classes, "class", self.source)
        return self._subset(np.isin(self.labels, keep))

    def select_groups(self, group_names: Iterable[str | int]) -> ImageDataset:
        """The images of the given groups (names or indices); classes and groups relabelled in order."""
        if self.group_names is None:
            raise ValueError(f"{self.source} is a flat dataset and has no groups; "
                             "load a '<group>/<class>/<image>' dataset with layout='grouped' to select groups")
        keep = _resolve(group_names, self.group_names, "group", self.source)
        return self._subset(np.isin(self.groups, keep))

    def select_items(self, mask) -> ImageDataset:
        """The images where ``mask`` (N,) is true (e.g. those that decoded); classes relabelled in order."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (len(self),):
            raise ValueError(f"mask must have shape ({len(self)},), got {mask.shape}")
        return self._subset(mask)

    def _subset(self, mask: np.ndarray) -> ImageDataset:
        index = np.flatnonzero(mask)
        kept, labels = np.unique(self.labels[index], return_inverse=True)
        groups = group_names = None
        if self.groups is not None:
            kept_groups, groups = np.unique(self.groups[index], return_inverse=True)
            groups, group_names = groups.astype(np.int64), [self.group_names[g] for g in kept_groups]
        return ImageDataset(
            items=[self.items[i] for i in index], names=[self.names[i] for i in index],
            labels=labels.astype(np.int64), classes=[self.classes[c] for c in kept],
            groups=groups, group_names=group_names, source=self.source,
        )


def _resolve(wanted: Iterable[str | int], names: list[str], kind: str, source: str) -> np.ndarray:
    """Names or indices -> sorted unique indices into ``names``; unknown or repeated ones are errors."""
    if isinstance(wanted, (str, bytes)):
        wanted = [wanted]  # one name, not its characters
    lookup = {name: i for i, name in enumerate(names)}
    out = []
    for w in wanted:
        if isinstance(w, numbers.Integral) and not isinstance(w, bool):
            if not 0 <= w < len(names):
                raise ValueError(f"{kind} index {w} is out of range; {source} has {len(names)} {_plural(kind)}")
            out.append(int(w))
        elif w in lookup:
            out.append(lookup[w])
        else:
            raise ValueError(f"unknown {kind} {w!r} in {source}; known {_plural(kind)} start with {names[:5]}")
    if len(set(out)) != len(out):
        repeated = sorted(names[i] for i in set(out) if out.count(i) > 1)
        raise ValueError(f"{_plural(kind)} listed more than once: {repeated}; list each once")
    return np.array(sorted(out), dtype=np.int64)


def _plural(kind: str) -> str:
    return "classes" if kind == "class" else f"{kind}s"


# --- loading ------------------------------------------------------------------------------------


def load_dataset(root: str | os.PathLike, *, layout: str = "auto") -> ImageDataset:
    """Load a flat (``class/image``) or grouped (``group/class/image``) dataset from a folder or a ``.zip``.

    Zips are read in place (never extracted), their members' bytes eagerly; members bigger than
    ``MAX_ZIP_MEMBER_BYTES`` or compressed beyond ``MAX_ZIP_RATIO``, and members that cannot be read (bad
    CRC, encrypted, unsupported compression), are skipped with one warning. A single top-level folder
    wrapping everything in a zip (``images_background/``) is stripped. ``layout="auto"`` picks grouped
    when images sit two folder levels below the root and flat when one. Hidden files and folders
    (``.x``, ``__MACOSX``) are skipped and only ``IMAGE_EXTENSIONS`` files (any case) are kept.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    path = Path(root)
    if path.is_dir():
        found = [(parts, os.path.join(os.fspath(path), *parts)) for parts in _folder_images(path)]
    elif path.is_file() and zipfile.is_zipfile(path):
        found = _zip_images(path, layout)
    elif path.exists():
        raise ValueError(f"{path} is neither a folder nor a zip file; {_EXPECTED}")
    else:
        raise ValueError(f"{path} does not exist; pass a dataset folder or a .zip of one")
    if not found:
        raise ValueError(f"{path} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); {_EXPECTED}")
    depth = _depth(found, layout, path)
    found.sort(key=lambda pair: pair[0])  # part by part, so 'a/b' sorts before 'a.b/c' as in a file browser
    return _build(found, depth, os.fspath(path))


def _folder_images(top: Path) -> list[tuple[str, ...]]:
    out = []
    for folder, dirs, files in os.walk(top, followlinks=True):
        rel = Path(folder).relative_to(top).parts
        if len(rel) >= 3:  # deeper than any layout: stop here (also ends symlink loops)
            out.extend(rel + (f,) for f in files if _is_image(f))
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not _hidden(d)]
        out.extend(rel + (f,) for f in files if _is_image(f))
    return out


def _zip_images(path: Path, layout: str) -> list[tuple[tuple[str, ...], NamedBytes]]:
    with zipfile.ZipFile(path) as zf:
        members = []
        for info in zf.infolist():
            parts = tuple(p for p in info.filename.split("/") if p)
            if not info.is_dir() and parts and _is_image(parts[-1]) and not any(map(_hidden, parts[:-1])):
                members.append((parts, info))
        tops = {parts[0] for parts, _ in members}
        if len(tops) == 1 and _is_wrapper(members, layout):
            members = [(parts[1:], info) for parts, info in members]
        seen: set[tuple[str, ...]] = set()
        for parts, _info in members:
            if parts in seen:
                raise ValueError(f"{path} holds {'/'.join(parts)} twice; rebuild the zip without duplicates")
            seen.add(parts)
        found, skipped = [], []
        for parts, info in members:
            data = _read_member(zf, info, skipped)
            if data is not None:
                found.append((parts, NamedBytes(data, f"{path}:{info.filename}")))
        if skipped:
            shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            warnings.warn(f"{path}: skipped {len(skipped)} member(s) that cannot be read safely: {shown}",
                          RuntimeWarning, stacklevel=3)
        return found


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, skipped: list[str]) -> bytes | None:
    """A member's bytes, or None (with the reason appended to ``skipped``) when it is not a plausible
    image or cannot be read. Sizes are checked from the directory before anything is decompressed, and
    zipfile never returns more than the declared size (more data fails the CRC check)."""
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > MAX_ZIP_MEMBER_BYTES:
        reason = f"{info.file_size} bytes uncompressed, more than the {MAX_ZIP_MEMBER_BYTES} allowed"
    elif info.file_size > 2**20 and ratio > MAX_ZIP_RATIO:
        reason = f"compressed {ratio:.0f}:1, more than the {MAX_ZIP_RATIO}:1 an image file reaches"
    else:
        try:
            return zf.read(info)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__  # e.g. "Bad CRC-32 for file ..."
        except RuntimeError as exc:  # zipfile's words for an encrypted member
            reason = f"encrypted ({' '.join(str(exc).split())})"
        except NotImplementedError as exc:
            reason = f"unsupported compression ({' '.join(str(exc).split())})"
    skipped.append(f"{info.filename} ({reason})")
    return None


def _is_wrapper(members: list, layout: str) -> bool:
    """A zip's single top folder is a wrapper unless the requested layout needs it as a level itself."""
    depths = {len(parts) - 1 for parts, _ in members}
    if layout == "auto":
        return min(depths) >= 2  # e.g. 'caltech101/<class>/x.jpg': a lone class would be a dataset of one
    return max(depths) > _DEPTH[layout]


def _depth(found: list, layout: str, path: Path) -> int:
    depths = {len(parts) - 1 for parts, _ in found}
    want = _DEPTH.get(layout)
    if want is None:  # auto
        if len(depths) == 1 and next(iter(depths)) in (1, 2):
            return next(iter(depths))
        want = 2 if 2 in depths else 1
    bad = next((parts for parts, _ in found if len(parts) - 1 != want), None)
    if bad is not None:
        shown = "/".join(bad)
        name = "grouped" if want == 2 else "flat"
        raise ValueError(f"{path}: image {shown!r} does not fit the {name} layout "
                         f"({'<group>/<class>/<image>' if want == 2 else '<class>/<image>'}); {_EXPECTED}; "
                         "move or delete images at other depths")
    return want


def _build(found: list, depth: int, source: str) -> ImageDataset:
    class_keys = sorted({parts[:depth] for parts, _ in found})
    class_index = {key: i for i, key in enumerate(class_keys)}
    labels = np.array([class_index[parts[:depth]] for parts, _ in found], dtype=np.int64)
    groups = group_names = None
    if depth == 2:
        group_names = sorted({key[0] for key in class_keys})
        group_index = {name: i for i, name in enumerate(group_names)}
        groups = np.array([group_index[parts[0]] for parts, _ in found], dtype=np.int64)
    return ImageDataset(
        items=[item for _, item in found], names=["/".join(parts) for parts, _ in found], labels=labels,
        classes=["/".join(key) for key in class_keys], groups=groups, group_names=group_names, source=source,
    )


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _JUNK_DIRS


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# --- splits -------------------------------------------------------------------------------------


def split_by_group(dataset: ImageDataset, test: Sequence[str] | int, *, seed: int = 0
                   ) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) with disjoint groups: ``test`` names the test groups, or is how many to draw at random."""
    if dataset.group_names is None:
        raise ValueError(f"{dataset.source} is a flat dataset; use split_by_class, or load a grouped "
                         "dataset ('<group>/<class>/<image>') with layout='grouped'")
    chosen = _draw(test, dataset.group_names, [[name] for name in dataset.group_names], seed, "group",
                   dataset.source)
    rest = np.setdiff1d(np.arange(len(dataset.group_names)), chosen)
    return dataset.select_groups(rest), dataset.select_groups(chosen)


def split_by_class(dataset: ImageDataset, test: Sequence[str] | int | float, *, seed: int = 0,
                   together: Iterable[Iterable[str]] = ()) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) with disjoint classes: ``test`` names the test classes, or is a count or a fraction
    of classes to draw at random.

    ``together`` lists sets of classes that must land on the same side (e.g. Caltech-101's ``Faces`` and
    ``Faces_easy``, which show the same people): a random draw takes or leaves each set whole, and an
    explicit list must hold all of a set or none of it. Grouped datasets keep their groups.
    """
    units = _units(dataset.classes, together, dataset.source)
    chosen = _draw(test, dataset.classes, units, seed, "class", dataset.source)
    chosen_set = set(chosen.tolist())
    for unit in units:
        inside = [dataset.classes.index(c) in chosen_set for c in unit]
        if any(inside) and not all(inside):
            raise ValueError(f"classes {unit} must stay together (together=...), but only some are in test; "
                             "list all of them in test or none")
    rest = np.setdiff1d(np.arange(len(dataset.classes)), chosen)
    return dataset.select_classes(rest), dataset.select_classes(chosen)


def _units(classes: list[str], together: Iterable[Iterable[str]], source: str) -> list[list[str]]:
    """Classes as units of a random draw: the ``together`` sets, then every other class alone."""
    units, used = [], set()
    for unit in together:
        unit = [unit] if isinstance(unit, str) else list(unit)
        for name in unit:
            if name not in classes:
                raise ValueError(f"together names unknown class {name!r} of {source}")
            if name in used:
                raise ValueError(f"class {name!r} appears in more than one together set; merge those sets")
            used.add(name)
        units.append(unit)
    return units + [[name] for name in classes if name not in used]


def _draw(test, names: list[str], units: list[list[str]], seed: int, kind: str, source: str) -> np.ndarray:
    """Indices of the test side: the names given, or whole units drawn at random up to a count."""
    plural, n = _plural(kind), len(names)
    if isinstance(test, bool):
        raise ValueError(f"test must be a list of {kind} names or a count, got {test!r}")
    if isinstance(test, numbers.Real) and not isinstance(test, numbers.Integral):
        if kind != "class" or not 0 < test < 1:
            allowed = "a fraction in (0, 1), " if kind == "class" else ""
            raise ValueError(f"test must be a list of {kind} names, {allowed}or a count, got {test!r}")
        test = max(1, min(n - 1, round(test * n)))
    if isinstance(test, numbers.Integral):
        if not 0 < test < n:
            raise ValueError(f"test={test} {plural}, but {source} has {n}; draw between 1 and {n - 1} so both "
                             "sides keep some")
        lookup = {name: i for i, name in enumerate(names)}
        rng = np.random.default_rng(seed)
        chosen: list[int] = []
        for u in rng.permutation(len(units)):  # greedy over a random order: exact unless sets overshoot
            if len(chosen) + len(units[u]) <= test:
                chosen += [lookup[name] for name in units[u]]
        return np.array(sorted(chosen), dtype=np.int64)
    chosen = _resolve(test, names, kind, source)
    if not 0 < len(chosen) < n:
        raise ValueError(f"test lists {len(chosen)} of the {n} {plural} of {source}; leave at least one on each side")
    return chosen


# --- plain class folders (the demo's input) -----------------------------------------------------


def class_folders(root: str | os.PathLike) -> dict[str, list[Path]]:
    """``{label: sorted image paths}`` for each subfolder of ``root`` holding images (recursively, the
    images a folder given to ``register`` would expand to); images directly in ``root`` are skipped
    with a warning, as they belong to no class."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; expected one subfolder of images per class")
    stray = sorted(p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not p.name.startswith("."))
    if stray:
        warnings.warn(f"{len(stray)} image(s) directly in {root} belong to no class and are skipped (first: "
                      f"{stray[0]}); put them in a subfolder named after their class", UserWarning, stacklevel=2)
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = [Path(p) for p in expand_inputs(str(folder))]
        if images:
            classes[folder.name] = images
    if not classes:
        raise ValueError(f"{root} has no subfolders with images; put each class's images in a subfolder named after it")
    return classes


def support_query_split(classes: dict[str, list], shots: int, seed: int) -> tuple[dict[str, list], dict[str, list]]:
    """Per class, ``shots`` random support items and the rest as queries (seeded, replayable)."""
    rng = np.random.default_rng(seed)
    support, query = {}, {}
    for label, items in classes.items():
        order = rng.permutation(len(items))
        support[label] = [items[i] for i in order[:shots]]
        query[label] = [items[i] for i in order[shots:]]
    return support, query


def split_validation(dataset: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Hold out classes (or whole groups, for grouped data) for validation and early stopping."""
    if dataset.groups is not None and len(dataset.group_names) >= 4:
        n_val = max(1, round(fraction * len(dataset.group_names)))
        return split_by_group(dataset, n_val, seed=seed)
    return split_by_class(dataset, fraction, seed=seed)


def cap_per_class(dataset: ImageDataset, cap: int | None, seed: int | np.random.Generator = 0) -> ImageDataset:
    """At most ``cap`` images of each class (all of them when ``cap`` is None), a seeded sample drawn class by
    class in label order; ``seed`` may be a numpy ``Generator`` to draw from."""
    if cap is None:
        return dataset
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(dataset), dtype=bool)
    for label in np.unique(dataset.labels):
        keep[rng.permutation(np.flatnonzero(dataset.labels == label))[:cap]] = True
    return dataset.select_items(keep)


def with_rotations(dataset: ImageDataset) -> ImageDataset:
    """The dataset plus its images turned 90, 180 and 270 degrees, each turn a class (and group) of its
    own: the standard way to multiply training classes for symbols and characters (not for photos,
    whose rotated copies are still the same class). Unreadable images are dropped."""
    items, names, labels, classes = list(dataset.items), list(dataset.names), [dataset.labels], list(dataset.classes)
    groups = [dataset.groups] if dataset.groups is not None else None
    group_names = list(dataset.group_names) if dataset.group_names is not None else None
    for turn, angle in enumerate((90, 180, 270), start=1):
        for item, name in zip(dataset.items, dataset.names):
            items.append(NamedBytes(_rotated_png(item, angle), f"{describe(item)}@{angle}"))
            names.append(f"{name}@{angle}")
        labels.append(dataset.labels + turn * len(dataset.classes))
        classes += [f"{c}@{angle}" for c in dataset.classes]
        if groups is not None:
            groups.append(dataset.groups + turn * len(dataset.group_names))
            group_names += [f"{g}@{angle}" for g in dataset.group_names]
    return ImageDataset(items=items, names=names, labels=np.concatenate(labels), classes=classes,
                        groups=np.concatenate(groups) if groups is not None else None, group_names=group_names,
                        source=f"{dataset.source} (+rotations)")


def _rotated_png(item, angle: int) -> bytes:
    """PNG bytes of a rotated image (lossless; small for drawings), or b"" if it cannot be read."""
    try:
        image = load_image(item).rotate(angle, expand=True)
    except ImageError:
        return b""  # fails again, alone, when embedded
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def embed_dataset(encoder: Encoder, dataset: ImageDataset, *, cache: EmbeddingCache | None = None,
                  progress: bool | None = None) -> tuple[np.ndarray, ImageDataset]:
    """Embed every image once (cached); unreadable images are left out with a warning."""
    result = encoder.embed_batch(dataset.items, cache=cache, progress=progress)
    if len(dataset) and not result.ok.any():
        raise ImageError(f"none of the {len(dataset)} images of {dataset.source} could be read "
                         f"(first: {result.errors[0]})")
    if not result.ok.all():
        failed = [e for e in result.errors if e]
        warnings.warn(f"{len(failed)} of {len(dataset)} images could not be read and are left out "
                      f"(first: {failed[0]})", RuntimeWarning, stacklevel=2)
        dataset = dataset.select_items(result.ok)
    return result.vectors[result.ok], dataset
