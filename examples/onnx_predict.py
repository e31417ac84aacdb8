"""Predict with an exported classifier using onnxruntime, numpy and Pillow (no torch).

    fewshot export --registry shop.reg --out shop-onnx
    python examples/onnx_predict.py shop-onnx photo1.jpg photo2.jpg [--top-k 3] [--int8] [--json]

Prints, per image, the nearest class or "unknown", its probability, similarity and the top-k, deciding as
`fewshot predict` does: the top-1 similarity against the threshold the registry fitted for that class.
Images are decoded by `fewshot.embedding.images`, the same rules as fewshot itself (allowed formats, decompression-bomb
and aspect limits, orientation, transparency over white); it imports neither torch nor the rest of
fewshot, so a deployment machine needs only `pip install --no-deps fewshot onnxruntime numpy pillow`.
Only the files bundle.json lists are read, each checked against its size and sha256.
Exit status as `fewshot predict`: 0, or 1 when an image failed (it gets an error entry; the others are
answered) or the bundle is unusable (one line on stderr).
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from fewshot.errors import ImageError
from fewshot.embedding.images import limit_aspect, load_image

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
REGISTRY_ROLES = ("encoder", "preprocess", "prototypes", "labels", "counts", "thresholds", "registry")
BATCH = 16  # images preprocessed and embedded at a time: memory stays bounded whatever the count


class BundleError(Exception):
    """The bundle folder is not a complete, intact `fewshot export --registry` folder."""


class Bundle:
    """The exported classifier: only the files bundle.json lists, each checked, and consistent shapes."""

    def __init__(self, folder: Path, int8: bool = False):
        self.folder = folder
        manifest = self._json_file(folder / "bundle.json")
        self.files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(self.files, dict):
            raise BundleError(f"{folder}: bundle.json lists no files; export again with `fewshot export`")
        missing = [r for r in REGISTRY_ROLES + (("encoder_int8",) if int8 else ()) if r not in self.files]
        if missing:
            raise BundleError(f"{folder}: bundle.json lists no {', '.join(missing)}; export a registry with "
                              f"`fewshot export --registry REG --out NEW_DIR`" + (" --int8" if int8 else ""))
        self.preprocess = self._json("preprocess")
        self.info = self._json("registry")
        self.labels = self._json("labels")
        self.prototypes = self._array("prototypes")
        self.counts = self._array("counts")
        self.thresholds = self._array("thresholds")
        self.encoder = _session(self._path("encoder_int8" if int8 else "encoder"))
        self.head = _session(self._path("head")) if "head" in self.files else None
        self._check_shapes()

    def _path(self, role: str) -> Path:
        entry = self.files[role]
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise BundleError(f"{self.folder}: bundle.json names no plain file for {role!r}")
        path = self.folder / name
        if not path.is_file() or path.stat().st_size != entry.get("bytes") or _sha256(path) != entry.get("sha256"):
            raise BundleError(f"{path}: missing, or not the file bundle.json lists (size or sha256 differ); "
                              f"export again")
        return path

    def _json(self, role: str):
        return self._json_file(self._path(role))

    def _json_file(self, path: Path):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: cannot read it as JSON ({exc}); export again") from exc

    def _array(self, role: str) -> np.ndarray:
        return np.load(self._path(role), allow_pickle=False)

    def _check_shapes(self) -> None:
        classes, dim = self.info.get("classes"), self.info.get("dim")
        expected = {"prototypes": (classes, dim), "counts": (classes,), "thresholds": (classes,)}
        for role, shape in expected.items():
            if getattr(self, role).shape != shape:
                raise BundleError(f"{self.folder}: {role} has shape {getattr(self, role).shape}, registry.json "
                                  f"says {shape}; export again")
        if not isinstance(self.labels, list) or len(self.labels) != classes:
            raise BundleError(f"{self.folder}: labels.json does not hold {classes} labels; export again")
        crop = self.preprocess["center_crop"]
        if _shape(self.encoder, "inputs")[1:] != [3, *crop]:
            raise BundleError(f"{self.folder}: the encoder does not take {crop} images as preprocess.json says")
        out_dim = _shape(self.encoder, "outputs")[-1]
        if self.head is not None:
            if _shape(self.head, "inputs")[-1] != out_dim:
                raise BundleError(f"{self.folder}: head.onnx does not take the encoder's {out_dim}-d embeddings")
            out_dim = _shape(self.head, "outputs")[-1]
        if out_dim != dim:
            raise BundleError(f"{self.folder}: the model gives {out_dim}-d vectors, the prototypes are {dim}-d")

    def predict(self, images: list, top_k: int) -> list[dict]:
        """One answer per image, in order, shaped as `fewshot predict --json` prints them."""
        answers = [None] * len(images)
        for start in range(0, len(images), BATCH):
            arrays, rows = [], []
            for row in range(start, min(start + BATCH, len(images))):
                try:
                    arrays.append(preprocess(images[row], self.preprocess))
                    rows.append(row)
                except ImageError as exc:
                    answers[row] = {"input": str(images[row]), "label": None, "score": None, "similarity": None,
                                    "unknown": False, "top_k": [], "error": " ".join(str(exc).split())}
            if rows:
                for row, answer in zip(rows, self.classify(self.embed(np.stack(arrays)), top_k)):
                    answers[row] = {"input": str(images[row]), **answer}
        return answers

    def embed(self, batch: np.ndarray) -> np.ndarray:
        vectors = _run(self.encoder, batch)
        return _run(self.head, vectors) if self.head is not None else vectors

    def classify(self, vectors: np.ndarray, top_k: int) -> list[dict]:
        """Nearest classes, probabilities over the nearest `softmax_candidates`, and the unknown decision."""
        if self.info["metric"] == "cosine":
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
            scores = vectors @ self.prototypes.T
        else:  # squared Euclidean distance, negated so that higher is nearer
            scores = -((vectors ** 2).sum(1)[:, None] - 2 * vectors @ self.prototypes.T
                       + (self.prototypes ** 2).sum(1)[None])
        k = min(len(self.labels), max(top_k, self.info["softmax_candidates"]))
        nearest = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # the k nearest classes, then nearest first
        nearest = np.take_along_axis(nearest, np.argsort(-np.take_along_axis(scores, nearest, 1), axis=1), 1)
        similarities = np.take_along_axis(scores, nearest, 1)
        logits = similarities / self.info["temperature"]
        probs = np.exp(logits - logits[:, :1])
        probs /= probs.sum(axis=1, keepdims=True)
        answers = []
        for rows, p, sims in zip(nearest, probs, similarities):
            unknown = bool(sims[0] < self.thresholds[rows[0]])  # NaN threshold: never unknown
            answers.append({"label": None if unknown else self.labels[rows[0]], "score": float(p[0]),
                            "similarity": float(sims[0]), "unknown": unknown,
                            "top_k": [{"label": self.labels[i], "score": float(q), "similarity": float(s)}
                                      for i, q, s in zip(rows[:top_k], p, sims)], "error": None})
        return answers


def preprocess(path, cfg: dict) -> np.ndarray:
    """Decode as fewshot does, resize the shorter side, centre-crop, scale to [0, 1], normalise: one
    (3, H, W) float32 array. Raises ImageError (one line) for anything that is not a usable image."""
    img = limit_aspect(load_image(path, min_size=cfg["resize_shorter_to"]))
    w, h = img.size
    short = cfg["resize_shorter_to"]
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize(size, RESAMPLE[cfg["interpolation"]])
    crop_h, crop_w = cfg["center_crop"]
    left, top = int(round((size[0] - crop_w) / 2.0)), int(round((size[1] - crop_h) / 2.0))
    img = img.crop((left, top, left + crop_w, top + crop_h))
    x = np.asarray(img, dtype=np.float32) * np.float32(cfg["scale"])
    x = (x - np.array(cfg["mean"], np.float32)) / np.array(cfg["std"], np.float32)
    return x.transpose(2, 0, 1)


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _shape(session, which: str) -> list:
    return list(getattr(session, f"get_{which}")()[0].shape)


def _run(session, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="folder written by `fewshot export --registry REG`")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--int8", action="store_true", help="use encoder.int8.onnx (export --int8)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.top_k < 1:
        parser.error("--top-k must be a positive integer")
    try:
        bundle = Bundle(args.bundle, int8=args.int8)
    except BundleError as exc:
        print(f"onnx_predict.py: error: {exc}", file=sys.stderr)
        return 1
    answers = bundle.predict(args.images, args.top_k)
    if args.json:
        print(json.dumps(answers, indent=2, ensure_ascii=False))
    for a in answers if not args.json else []:
        if a["error"]:
            print(f"{a['input']}\terror: {a['error']}")
            continue
        others = ", ".join(f"{t['label']} {t['score']:.3f}" for t in a["top_k"])
        print(f"{a['input']}\t{a['label'] or 'unknown'}\t{a['score']:.3f}\tsimilarity {a['similarity']:.3f}"
              f"\t[{others}]")
    return 1 if any(a["error"] for a in answers) else 0


if __name__ == "__main__":
    sys.exit(main())
