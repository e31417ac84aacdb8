"""Datasets laid out as one folder per class."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .images import IMAGE_EXTENSIONS


def class_folders(root: str | os.PathLike) -> dict[str, list[Path]]:
    """``{label: sorted image paths}`` for each subfolder of ``root`` holding images (recursively)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; expected one subfolder of images per class")
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                        and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
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
