"""``fewshot demo``: register classes from a few images and predict, offline, in a few seconds.

Bundled data (nothing is downloaded):
- few-shot categories: scikit-learn's handwritten digits, written out as PNG files, one folder per
  digit; each digit is registered from ``shots`` images and the rest are predicted;
- one-shot instances: scikit-image's photos (an astronaut, a cat, a cup of coffee, ...), each
  registered from its single file; queries are cropped, flipped, rotated and recoloured views.
``--data DIR`` runs the few-shot part on your folder instead (one subfolder per class).
Writes a contact sheet of queries and their predictions, and the registries (digits or your folder; photos).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from tqdm.auto import tqdm

from .classifier import FewShotClassifier
from .data.datasets import class_folders, support_query_split
from .embedding.images import load_image

# scikit-image sample photos of distinct things, one-shot "instances".
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "coins.png", "camera.png",
          "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "moon.png", "page.png", "text.png"]
DIGITS_PER_CLASS = 40
VIEWS_PER_PHOTO = 4
SHEET_MAX = 48
PREDICT_CHUNK = 32  # queries per predict call, so the progress bar moves


def run_demo(*, data=None, out: Path = Path("demo-output"), shots: int = 5, seed: int = 0,
             encoder: str | None = None, weights=None, progress: bool | None = None) -> int:
    """``progress``: None = bars on stderr when it is a terminal, True/False = always/never."""
    out.mkdir(parents=True, exist_ok=True)
    classifier = FewShotClassifier(encoder or "efficientnet_lite0", weights=weights, progress=False)
    rng = np.random.default_rng(seed)
    folder = Path(data) if data else write_digits(out / "digits")
    shown, total = [], 0
    name = "your folder" if data else "digits"
    accuracy, samples = few_shot_run(classifier, folder, shots=shots, seed=seed, progress=progress)
    print(f"{name}: {shots}-shot, {len(classifier.classes)} classes, accuracy {accuracy:.1%} "
          f"on {len(samples)} queries")
    shown += _sample(samples, SHEET_MAX if data else SHEET_MAX // 2, rng)
    total += len(samples)
    classifier.save(out / "registry")
    saved = [f"{out / 'registry'} ({len(classifier.classes)} classes)"]
    if not data:
        # Photos get a registry of their own: each registry fits its "unknown" threshold to its own
        # classes, and handwritten digits and photos are different worlds.
        photos = FewShotClassifier(encoder or "efficientnet_lite0", weights=weights, progress=False)
        accuracy, samples = one_shot_photos(photos, rng, progress=progress)
        print(f"photos: 1-shot, {len(PHOTOS)} instances, accuracy {accuracy:.1%} on {len(samples)} augmented views")
        shown += _sample(samples, SHEET_MAX // 2, rng)
        total += len(samples)
        photos.save(out / "photos-registry")
        saved.append(f"{out / 'photos-registry'} ({len(photos.classes)} classes)")
    sheet = contact_sheet(shown, out / "contact_sheet.png", total=total)
    print(f"wrote {sheet} ({sheet_title(len(shown), total)}), {' and '.join(saved)}")
    return 0


def few_shot_run(classifier: FewShotClassifier, folder: Path, *, shots: int, seed: int,
                 progress: bool | None = None):
    """Register ``shots`` images per class folder; predict the rest. Returns (accuracy, samples)."""
    support, query = support_query_split(class_folders(folder), shots, seed)
    for label, paths in tqdm(support.items(), desc="registering", unit="class", disable=_hidden(progress)):
        classifier.register(label, paths)
    paths = [p for items in query.values() for p in items]
    truth = [label for label, items in query.items() for _ in items]
    if not paths:
        raise ValueError(f"no images left to predict in {folder}: each class needs more than {shots} images")
    return _score(predict_with_progress(classifier, paths, progress), truth, paths)


def one_shot_photos(classifier: FewShotClassifier, rng: np.random.Generator, progress: bool | None = None):
    """Register each bundled photo from its file; predict augmented views of it."""
    import skimage

    root = Path(skimage.__file__).parent / "data"
    views, truth = [], []
    for name in tqdm(PHOTOS, desc="registering", unit="photo", disable=_hidden(progress)):
        label = Path(name).stem
        classifier.register(label, root / name)
        with Image.open(root / name) as photo:
            photo = photo.convert("RGB")
            views += [augment(photo, rng) for _ in range(VIEWS_PER_PHOTO)]
            truth += [label] * VIEWS_PER_PHOTO
    return _score(predict_with_progress(classifier, views, progress), truth, views)


def predict_with_progress(classifier: FewShotClassifier, images: list, progress: bool | None) -> list:
    predictions = []
    with tqdm(total=len(images), desc="predicting", unit="img", disable=_hidden(progress)) as bar:
        for start in range(0, len(images), PREDICT_CHUNK):
            chunk = images[start:start + PREDICT_CHUNK]
            predictions += classifier.predict(chunk)
            bar.update(len(chunk))
    return predictions


def _hidden(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # None: tqdm hides itself when not on a terminal


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A different view of the same thing: random crop, flip, small rotation, colour change."""
    w, h = image.size
    scale = rng.uniform(0.6, 0.9)
    cw, ch = int(w * scale), int(h * scale)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    view = image.crop((x, y, x + cw, y + ch)).rotate(float(rng.uniform(-15, 15)), fillcolor=(255, 255, 255))
    if rng.random() < 0.5:
        view = ImageOps.mirror(view)
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Color(view).enhance(rng.uniform(0.6, 1.4))


def write_digits(root: Path) -> Path:
    """scikit-learn's 8x8 digits as 64x64 PNG files, one folder per digit (dark ink on white)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(10):
        folder = root / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        for n, i in enumerate(np.flatnonzero(digits.target == digit)[:DIGITS_PER_CLASS]):
            pixels = (255 - digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels).resize((64, 64), Image.BICUBIC).save(folder / f"{n:03d}.png")
    return root


def _score(predictions, truth, images):
    """Closed-set accuracy of the nearest class (the demo's queries all show registered classes;
    an "unknown" answer is still scored by the class it was nearest to)."""
    samples = [(img, p.label if p.label is not None else "unknown", t) for img, p, t in zip(images, predictions, truth)]
    accuracy = float(np.mean([bool(p.top_k) and p.top_k[0][0] == t for p, t in zip(predictions, truth)]))
    return accuracy, samples


def _sample(samples, n, rng):
    picks = rng.choice(len(samples), size=min(n, len(samples)), replace=False)
    return [samples[i] for i in sorted(picks)]


def caption(predicted: str | None, truth: str) -> str:
    """A thumbnail's title: the answer, and for a wrong one the true class too."""
    answer = "unknown" if predicted is None else predicted
    return answer if predicted == truth else f"{answer}\n(true: {truth})"


def sheet_title(shown: int, total: int) -> str:
    return f"{shown} of {total} queries shown, a seeded sample" if total > shown else f"all {shown} queries"


def contact_sheet(samples, path: Path, columns: int = 8, total: int | None = None) -> Path:
    """A grid of query thumbnails titled with their predicted class: green if right, red (with the true
    class) if wrong. ``total``: the number of queries the sample was drawn from, said in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(samples) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.8))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, (image, predicted, truth) in zip(np.ravel(axes), samples):
        ax.imshow(load_image(image, min_size=128))
        ax.set_title(caption(predicted, truth), fontsize=8, color="green" if predicted == truth else "red",
                     parse_math=False)
    fig.suptitle(f"fewshot demo: predicted class per query (green = right, red = wrong, with the true class); "
                 f"{sheet_title(len(samples), total or len(samples))}", fontsize=10, parse_math=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
