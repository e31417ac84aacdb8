"""The user's domain data for ``fewshot adapt``: checked, split into training and validation classes, capped.

Classes (or whole groups, e.g. alphabets) are split in half, seeded and class-disjoint, so that validation
measures what the user will do: register NEW classes of the domain. Images per class and classes per split
are capped (seeded samples) so that every candidate's embedding pass fits the time budget.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ...data.datasets import ImageDataset, cap_per_class, split_validation
from ...embedding.images import expand_inputs

PASS_SHARE = 0.08  # one embedding pass over the domain may take this share of the budget (a dozen candidates fit)
MIN_PASS_IMAGES = 200
MIN_CLASSES = 4  # two for training, two for validation: fewer cannot measure transfer to new classes
MIN_IMAGES_PER_CLASS = 2  # a 1-shot support image and a query
VALIDATION_SHARE = 0.5


@dataclass(frozen=True)
class Caps:
    """How much of the domain each candidate embeds (seeded samples; the rest is left out)."""

    train_images_per_class: int = 20
    val_images_per_class: int = 10  # 5 support + 5 queries at 5 shots
    train_classes: int = 200
    val_classes: int = 100
    unlabeled: int = 2000


def caps_for_budget(images: int, seconds_per_image: float, budget: float, caps: Caps = Caps()) -> Caps:
    """Smaller caps when one pass over ``images`` images would take more than ``PASS_SHARE`` of the budget:
    classes and images per class shrink together (both matter to validation and training)."""
    affordable = max(MIN_PASS_IMAGES, PASS_SHARE * budget / max(seconds_per_image, 1e-6))
    if images <= affordable:
        return caps
    scale = (affordable / images) ** 0.5
    return Caps(train_images_per_class=max(5, int(caps.train_images_per_class * scale)),
                val_images_per_class=caps.val_images_per_class,
                train_classes=max(10, int(caps.train_classes * scale)),
                val_classes=max(10, int(caps.val_classes * scale)),
                unlabeled=max(50, int(caps.unlabeled * scale * scale)))


@dataclass(frozen=True)
class Domain:
    """Training and validation classes of the user's domain, and optional unlabelled images."""

    train: ImageDataset
    val: ImageDataset
    unlabeled: list

    @property
    def images(self) -> int:
        return len(self.train) + len(self.val) + len(self.unlabeled)

    def describe(self) -> dict:
        return {"train_classes": len(self.train.classes), "train_images": len(self.train),
                "val_classes": len(self.val.classes), "val_images": len(self.val),
                "unlabeled_images": len(self.unlabeled)}


def check_domain(dataset: ImageDataset) -> ImageDataset:
    """Drop classes with fewer than 2 images (warning); refuse fewer than 4 classes."""
    counts = np.bincount(dataset.labels, minlength=len(dataset.classes))
    small = np.flatnonzero(counts < MIN_IMAGES_PER_CLASS)
    if len(small):
        warnings.warn(f"{len(small)} classes have fewer than {MIN_IMAGES_PER_CLASS} images and are left out "
                      f"(first: {dataset.classes[small[0]]!r}); add images to use them", RuntimeWarning,
                      stacklevel=3)
        dataset = dataset.select_items(np.isin(dataset.labels, np.flatnonzero(counts >= MIN_IMAGES_PER_CLASS)))
    if len(dataset.classes) < MIN_CLASSES:
        raise ValueError(f"{dataset.source} has {len(dataset.classes)} classes with {MIN_IMAGES_PER_CLASS}+ images; "
                         f"adapt needs at least {MIN_CLASSES} (half to learn from, half to validate on new classes): "
                         "add labelled classes of your domain")
    return dataset


def split_domain(dataset: ImageDataset, unlabeled: list, caps: Caps, seed: int) -> Domain:
    """Split ``dataset`` into training and validation classes (groups kept together) and cap both."""
    train, val = split_validation(dataset, VALIDATION_SHARE, seed)
    if len(unlabeled) > caps.unlabeled:
        keep = np.sort(np.random.default_rng(seed + 2).choice(len(unlabeled), caps.unlabeled, replace=False))
        unlabeled = [unlabeled[i] for i in keep]
    return Domain(train=_capped(train, caps.train_classes, caps.train_images_per_class, seed),
                  val=_capped(val, caps.val_classes, caps.val_images_per_class, seed + 1),
                  unlabeled=list(unlabeled))


def _capped(dataset: ImageDataset, max_classes: int, per_class: int, seed: int) -> ImageDataset:
    rng = np.random.default_rng(seed)
    if len(dataset.classes) > max_classes:
        dataset = _fewer_classes(dataset, max_classes, rng)
    return cap_per_class(dataset, per_class, rng)


def _fewer_classes(dataset: ImageDataset, max_classes: int, rng: np.random.Generator) -> ImageDataset:
    """A seeded sample of about ``max_classes`` classes: whole groups when there are groups (within-group
    episodes need a group's classes together), else single classes."""
    if dataset.groups is None:
        return dataset.select_classes(np.sort(rng.choice(len(dataset.classes), max_classes, replace=False)))
    class_groups = dataset.class_groups
    chosen, total = [], 0
    for group in rng.permutation(len(dataset.group_names)):
        if total >= max_classes:
            break
        chosen.append(int(group))
        total += int(np.sum(class_groups == group))
    return dataset.select_groups(sorted(chosen))


def unlabeled_images(folder) -> list:
    """The image files under ``folder``; an error if it holds none."""
    items = [item for item in expand_inputs(folder) if isinstance(item, str)]
    if not items:
        raise ValueError(f"--unlabeled {folder} holds no image files (jpg, png, ...): give a folder of images of "
                         "your domain, or leave --unlabeled out")
    return items


def drop_unreadable(domain: Domain, ok: np.ndarray) -> Domain:
    """The domain without the images whose rows in ``ok`` (train, val, unlabeled order) are False."""
    n_train, n_val = len(domain.train), len(domain.val)
    if ok.all():
        return domain
    bad = int((~ok).sum())
    warnings.warn(f"{bad} of {len(ok)} images could not be read and are left out", RuntimeWarning, stacklevel=3)
    train = domain.train.select_items(ok[:n_train])
    val = domain.val.select_items(ok[n_train:n_train + n_val])
    unlabeled = [item for item, good in zip(domain.unlabeled, ok[n_train + n_val:]) if good]
    for name, part in (("training", train), ("validation", val)):
        if len(part.classes) < MIN_CLASSES // 2:
            raise ValueError(f"too few readable {name} classes are left ({len(part.classes)}); check the images "
                             "of your --data folder")
    return Domain(train=train, val=val, unlabeled=unlabeled)
