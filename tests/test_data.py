"""Datasets from folders and zips: layouts, names, labels, groups, splits."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot.data.datasets import (ImageDataset, class_folders, load_dataset, split_by_class, split_by_group,
                          support_query_split)
from fewshot.embedding.images import NamedBytes, load_image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
OMNIGLOT = SHARED / "omniglot" / "images_background.zip"
CALTECH = SHARED / "caltech101" / "caltech101_base.zip"


def needs(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path.name} not found at {path} (needs ../shared/datasets beside the repo)")
    return path


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4, 4), value % 256).save(buf, format="PNG")
    return buf.getvalue()


# A grouped tree with the traps users' folders hold: hidden files and folders, other files, upper-case
# extensions, names that sort differently byte-wise ("a.b" vs "a/...") than part by part.
GROUPED = ["Beta/char02/x.png", "Beta/char01/a.PNG", "Beta/char01/b.png", "Alpha/char10/1.jpg",
           "Alpha/char10/2.jpg", "Alpha/char2/z.png", "Alpha.x/c/q.png"]
JUNK = [".DS_Store", "Beta/.hidden.png", "Beta/char01/notes.txt", "Alpha/.thumbs/char1/t.png"]
FLAT = ["dog/2.png", "dog/10.png", "cat/b.JPEG", "cat/a.jpg", "cat.x/k.png"]


def write_tree(root: Path, files: list[str]) -> Path:
    for i, name in enumerate(files):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(i))
    return root


def write_zip(path: Path, folder: Path, wrapper: str = "") -> Path:
    files = sorted((p for p in folder.rglob("*") if p.is_file()), reverse=True)  # order must not matter
    with zipfile.ZipFile(path, "w") as zf:
        if wrapper:
            zf.writestr(wrapper + "/", b"")  # a directory entry, as many zip tools write
        for p in files:
            member = p.relative_to(folder).as_posix()
            zf.writestr(f"{wrapper}/{member}" if wrapper else member,
                        p.read_bytes())
    return path


def same(a: ImageDataset, b: ImageDataset) -> None:
    assert a.names == b.names and a.classes == b.classes and a.group_names == b.group_names
    np.testing.assert_array_equal(a.labels, b.labels)
    if a.groups is None:
        assert b.groups is None
    else:
        np.testing.assert_array_equal(a.groups, b.groups)
    assert [load_bytes(x) for x in a.items] == [load_bytes(x) for x in b.items]


def load_bytes(item) -> bytes:
    return bytes(item) if isinstance(item, bytes) else Path(item).read_bytes()


def test_grouped_layout_from_folder_and_zip_gives_the_same_dataset(tmp_path):
    folder = write_tree(tmp_path / "data", GROUPED + JUNK)
    ds = load_dataset(folder)
    assert ds.names == ["Alpha/char10/1.jpg", "Alpha/char10/2.jpg", "Alpha/char2/z.png", "Alpha.x/c/q.png",
                        "Beta/char01/a.PNG", "Beta/char01/b.png", "Beta/char02/x.png"]
    assert ds.classes == ["Alpha/char10", "Alpha/char2", "Alpha.x/c", "Beta/char01", "Beta/char02"]
    assert ds.group_names == ["Alpha", "Alpha.x", "Beta"]
    assert ds.labels.tolist() == [0, 0, 1, 2, 3, 3, 4] and ds.labels.dtype == np.int64
    assert ds.groups.tolist() == [0, 0, 0, 1, 2, 2, 2]
    assert ds.class_groups.tolist() == [0, 0, 1, 2, 2]
    assert all(isinstance(x, str) and Path(x).is_file() for x in ds.items)
    same(ds, load_dataset(folder, layout="grouped"))
    for wrapper in ("", "images_background"):
        zipped = load_dataset(write_zip(tmp_path / f"d{wrapper}.zip", folder, wrapper))
        same(ds, zipped)
        same(ds, load_dataset(tmp_path / f"d{wrapper}.zip", layout="grouped"))
        assert all(isinstance(x, NamedBytes) for x in zipped.items)
        prefix = f"{wrapper}/" if wrapper else ""
        assert zipped.items[0].name == f"{tmp_path / f'd{wrapper}.zip'}:{prefix}Alpha/char10/1.jpg"


def test_flat_layout_from_folder_and_zip_gives_the_same_dataset(tmp_path):
    folder = write_tree(tmp_path / "data", FLAT + [".DS_Store", "cat/.x.png", "dog/readme.md"])
    ds = load_dataset(folder)
    assert ds.names == ["cat/a.jpg", "cat/b.JPEG", "cat.x/k.png", "dog/10.png", "dog/2.png"]
    assert ds.classes == ["cat", "cat.x", "dog"] and ds.labels.tolist() == [0, 0, 1, 2, 2]
    assert ds.groups is None and ds.group_names is None and ds.class_groups is None
    same(ds, load_dataset(folder, layout="flat"))
    for wrapper in ("", "caltech101"):
        same(ds, load_dataset(write_zip(tmp_path / f"d{wrapper}.zip", folder, wrapper)))
        same(ds, load_dataset(tmp_path / f"d{wrapper}.zip", layout="flat"))


def test_explicit_layout_keeps_a_lone_top_folder_as_a_group(tmp_path):
    """'Alphabet/char/x.png' in a zip: auto reads a wrapper around flat classes, grouped one group."""
    folder = write_tree(tmp_path / "data", ["Greek/alpha/1.png", "Greek/beta/1.png"])
    zipped = write_zip(tmp_path / "greek.zip", folder)
    assert load_dataset(zipped).classes == ["alpha", "beta"]
    grouped = load_dataset(zipped, layout="grouped")
    assert grouped.classes == ["Greek/alpha", "Greek/beta"] and grouped.group_names == ["Greek"]


def test_bad_layouts_are_errors_that_show_the_expected_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files.*<class>/<image>"):
        load_dataset(tmp_path / "empty")
    mixed = write_tree(tmp_path / "mixed", ["a/1.png", "g/b/2.png"])
    with pytest.raises(ValueError, match="'a/1.png' does not fit the grouped layout"):
        load_dataset(mixed)
    loose = write_tree(tmp_path / "loose", ["1.png", "2.png"])
    with pytest.raises(ValueError, match="flat layout"):
        load_dataset(loose)
    grouped = write_tree(tmp_path / "grouped", ["g/a/1.png"])
    with pytest.raises(ValueError, match="flat layout"):
        load_dataset(grouped, layout="flat")
    with pytest.raises(ValueError, match="layout must be one of"):
        load_dataset(grouped, layout="nested")
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a folder nor a zip"):
        load_dataset(tmp_path / "notes.txt")
    with zipfile.ZipFile(tmp_path / "docs.zip", "w") as zf:
        zf.writestr("docs/readme.txt", "no images here")
    with pytest.raises(ValueError, match="no image files"):
        load_dataset(tmp_path / "docs.zip")


def test_omniglot_zip():
    t = time.perf_counter()
    ds = load_dataset(needs(OMNIGLOT))
    assert time.perf_counter() - t < 10  # about 1 s here; guards against per-item zip reopening etc.
    assert (len(ds), len(ds.classes), len(ds.group_names)) == (19280, 964, 30)
    assert ds.names[0] == "Alphabet_of_the_Magi/character01/0709_01.png"
    assert all(c.split("/")[0] in ds.group_names and c.split("/")[1].startswith("character") for c in ds.classes)
    assert np.bincount(ds.labels).tolist() == [20] * 964
    assert [ds.group_names[g] for g in ds.class_groups] == [c.split("/")[0] for c in ds.classes]
    assert ds.items[0].name.endswith(".zip:images_background/Alphabet_of_the_Magi/character01/0709_01.png")
    image = load_image(ds.items[12345])
    assert image.size == (105, 105) and image.mode == "RGB"


def test_omniglot_minimal_splits_are_five_background_alphabets():
    full = load_dataset(needs(OMNIGLOT))
    small = [load_dataset(needs(SHARED / "omniglot" / f"images_background_small{i}.zip")) for i in (1, 2)]
    for ds in small:  # the two minimal splits share some alphabets, so only check each against the full set
        assert len(ds.group_names) == 5 and set(ds.names) <= set(full.names)
        assert set(ds.classes) == {c for c in full.classes if c.split("/")[0] in ds.group_names}


def test_caltech_zip():
    ds = load_dataset(needs(CALTECH))
    assert (len(ds), len(ds.classes), ds.groups) == (4940, 51, None)
    assert "Faces_easy" in ds.classes and ds.names[0].startswith("Faces/")
    assert load_image(ds.items[-1]).mode == "RGB"


def synthetic(groups: int = 4, classes_per_group: int = 3, per_class: int = 2) -> ImageDataset:
    names, labels, group_of = [], [], []
    classes = [f"G{g}/c{c}" for g in range(groups) for c in range(classes_per_group)]
    for k, name in enumerate(classes):
        names += [f"{name}/{i}.png" for i in range(per_class)]
        labels += [k] * per_class
        group_of += [k // classes_per_group] * per_class
    return ImageDataset(items=list(names), names=names, labels=np.array(labels), classes=classes,
                        groups=np.array(group_of), group_names=[f"G{g}" for g in range(groups)], source="synthetic")


def test_select_classes_relabels_in_dataset_order_and_keeps_groups():
    ds = synthetic()
    sub = ds.select_classes(["G3/c0", "G1/c2", 0])
    assert sub.classes == ["G0/c0", "G1/c2", "G3/c0"]
    assert sub.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert sub.names == ["G0/c0/0.png", "G0/c0/1.png", "G1/c2/0.png", "G1/c2/1.png", "G3/c0/0.png", "G3/c0/1.png"]
    assert sub.group_names == ["G0", "G1", "G3"] and sub.groups.tolist() == [0, 0, 1, 1, 2, 2]
    assert sub.items == sub.names and sub.source == "synthetic"
    with pytest.raises(ValueError, match="unknown class 'G9/c0'"):
        ds.select_classes(["G9/c0"])
    with pytest.raises(ValueError, match="more than once"):
        ds.select_classes(["G0/c0", 0])
    with pytest.raises(ValueError, match="out of range"):
        ds.select_classes([12])


def test_select_groups(tmp_path):
    ds = synthetic()
    sub = ds.select_groups(["G2", "G0"])
    assert sub.group_names == ["G0", "G2"] and sub.classes == ["G0/c0", "G0/c1", "G0/c2", "G2/c0", "G2/c1", "G2/c2"]
    flat = load_dataset(write_tree(tmp_path / "f", FLAT))
    with pytest.raises(ValueError, match="flat dataset"):
        flat.select_groups(["cat"])


def test_split_by_group_is_disjoint_seeded_and_replayable():
    ds = load_dataset(needs(OMNIGLOT))
    train, test = split_by_group(ds, 10, seed=0)
    assert len(test.group_names) == 10 and len(train.group_names) == 20
    assert not set(train.group_names) & set(test.group_names) and not set(train.classes) & set(test.classes)
    assert len(train) + len(test) == len(ds) and not set(train.names) & set(test.names)
    again = split_by_group(ds, 10, seed=0)[1]
    assert again.group_names == test.group_names and again.names == test.names
    assert split_by_group(ds, 10, seed=1)[1].group_names != test.group_names
    named = split_by_group(ds, test.group_names[::-1])[1]  # a list: exactly those, in dataset order
    assert named.names == test.names
    # the item order and labels follow the dataset, so the test side is the same dataset sliced
    assert [ds.classes[ds.labels[ds.names.index(n)]] for n in test.names[:50]] == \
           [test.classes[label] for label in test.labels[:50]]


def test_split_by_group_errors():
    ds = synthetic()
    for bad in (0, 4, True):
        with pytest.raises(ValueError):
            split_by_group(ds, bad)
    with pytest.raises(ValueError, match="leave at least one"):
        split_by_group(ds, ["G0", "G1", "G2", "G3"])
    with pytest.raises(ValueError, match="unknown group 'G7'"):
        split_by_group(ds, ["G7"])
    with pytest.raises(ValueError, match="list of group names, or a count"):
        split_by_group(ds, 0.5)  # fractions are for classes only


def test_split_by_class_counts_fractions_and_names():
    ds = synthetic(groups=5, classes_per_group=4)  # 20 classes
    train, test = split_by_class(ds, 5, seed=3)
    assert len(test.classes) == 5 and len(train.classes) == 15 and not set(train.classes) & set(test.classes)
    assert test.group_names is not None  # groups kept
    assert split_by_class(ds, 5, seed=3)[1].classes == test.classes
    assert split_by_class(ds, 5, seed=4)[1].classes != test.classes
    assert len(split_by_class(ds, 0.25, seed=0)[1].classes) == 5
    assert split_by_class(ds, ["G1/c1", "G0/c3"])[1].classes == ["G0/c3", "G1/c1"]
    for bad in (0, 20, 1.0, 0.0, -0.5):
        with pytest.raises(ValueError):
            split_by_class(ds, bad)


def test_split_by_class_keeps_together_sets_on_one_side():
    ds = synthetic(groups=1, classes_per_group=12)
    pair = ("G0/c3", "G0/c7")
    sides = set()
    for seed in range(40):
        train, test = split_by_class(ds, 4, seed=seed, together=[pair])
        assert len(test.classes) == 4
        inside = [c in test.classes for c in pair]
        assert inside[0] == inside[1]
        sides.add(inside[0])
    assert sides == {True, False}  # the pair is drawn, as a unit, sometimes
    with pytest.raises(ValueError, match="must stay together"):
        split_by_class(ds, ["G0/c3"], together=[pair])
    with pytest.raises(ValueError, match="unknown class"):
        split_by_class(ds, 3, together=[("G0/c3", "nope")])


def test_class_folders_and_support_query_split_unchanged(tmp_path):
    folder = write_tree(tmp_path / "data", FLAT)
    classes = class_folders(folder)
    assert list(classes) == ["cat", "cat.x", "dog"] and all(isinstance(p, Path) for p in classes["cat"])
    support, query = support_query_split(classes, 1, seed=0)
    assert support == support_query_split(classes, 1, seed=0)[0]
    assert all(len(support[c]) == 1 and len(query[c]) == len(classes[c]) - 1 for c in classes)


def _png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4, 4), value).save(buf, format="PNG")
    return buf.getvalue()


def _patch_member(data: bytearray, name: str, local_offset: int, central_offset: int, value: bytes) -> None:
    """Overwrite a field of member ``name`` in both its local header and its central-directory entry."""
    encoded = name.encode()
    for signature, offset, name_at in ((b"PK\x03\x04", local_offset, 30), (b"PK\x01\x02", central_offset, 46)):
        start = 0
        while True:
            start = data.index(signature, start)
            if data[start + name_at:start + name_at + len(encoded)] == encoded:
                data[start + offset:start + offset + len(value)] = value
                break
            start += 1


def test_zip_members_that_are_too_big_or_unreadable_fail_alone(tmp_path):
    """A zip bomb member (declared huge, or compressed beyond any image's ratio), a bad CRC, an encrypted
    member and an unsupported compression are each skipped with one warning naming them; the other
    images load, and nothing big is ever read."""
    path = tmp_path / "hostile.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for c in ("cat", "dog"):
            for i in range(2):
                zf.writestr(f"{c}/{i}.png", _png_bytes(40 * i + (c == "dog")))
        with zf.open("cat/huge.png", "w", force_zip64=True) as member:  # 300 MiB declared and stored
            block = bytes(2**24)
            for _ in range(300 * 2**20 // len(block)):
                member.write(block)
        zf.writestr("dog/dense.bmp", bytes(40 * 2**20))  # 40 MiB of zeros: ratio far beyond an image's
        for name in ("cat/crc.png", "cat/locked.png", "dog/method.png"):
            zf.writestr(zipfile.ZipInfo(name), _png_bytes(7))  # stored
    data = bytearray(path.read_bytes())
    crc = zipfile.ZipFile(path).getinfo("cat/crc.png")
    data[crc.header_offset + 30 + len("cat/crc.png") + 20] ^= 0xFF  # a flipped byte in its stored data
    _patch_member(data, "cat/locked.png", 6, 8, b"\x01\x00")  # flag bit 0: encrypted
    _patch_member(data, "dog/method.png", 8, 10, b"\x63\x00")  # method 99 (AES): unsupported here
    path.write_bytes(bytes(data))
    assert path.stat().st_size < 4 * 2**20

    import resource
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.warns(RuntimeWarning) as caught:
        ds = load_dataset(path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert sorted(ds.names) == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    text = " ".join(str(w.message) for w in caught)
    for name in ("cat/huge.png", "dog/dense.bmp", "cat/crc.png", "cat/locked.png", "dog/method.png"):
        assert name in text
    assert len(caught) == 1 and "\n" not in text
    assert grown_mb < 100
