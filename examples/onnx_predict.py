"""Predict with an exported classifier using onnxruntime, numpy and Pillow only (no torch, no fewshot).

    fewshot export --registry shop.reg --out shop-onnx
    python examples/onnx_predict.py shop-onnx photo1.jpg photo2.jpg [--top-k 3] [--int8] [--json]

Prints, per image, the nearest class, its probability and the top-k, as `fewshot predict` does.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def preprocess(path, cfg):
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise: one (3, H, W) float32 array."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
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


def run(session, x):
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="folder written by `fewshot export --registry REG`")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--int8", action="store_true", help="use encoder.int8.onnx (export --int8)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    cfg = json.loads((args.bundle / "preprocess.json").read_text())
    info = json.loads((args.bundle / "registry.json").read_text())
    labels = json.loads((args.bundle / "labels.json").read_text())
    prototypes = np.load(args.bundle / "prototypes.npy", allow_pickle=False)
    encoder = ort.InferenceSession(str(args.bundle / ("encoder.int8.onnx" if args.int8 else "encoder.onnx")),
                                   providers=["CPUExecutionProvider"])
    head_path = args.bundle / "head.onnx"
    head = ort.InferenceSession(str(head_path), providers=["CPUExecutionProvider"]) if head_path.is_file() else None

    vectors = run(encoder, np.stack([preprocess(p, cfg) for p in args.images]))
    if head is not None:
        vectors = run(head, vectors)
    if info["metric"] == "cosine":
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        scores = vectors @ prototypes.T
    else:  # squared Euclidean distance, negated so that higher is nearer
        scores = -((vectors ** 2).sum(1)[:, None] - 2 * vectors @ prototypes.T + (prototypes ** 2).sum(1)[None])
    logits = scores / info["temperature"]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    results = []
    for path, p in zip(args.images, probs):
        order = np.argsort(-p)[: args.top_k]
        label = labels[order[0]]
        if info.get("unknown_threshold") is not None and p[order[0]] < info["unknown_threshold"]:
            label = None
        results.append({"input": str(path), "label": label, "score": float(p[order[0]]),
                        "top_k": [{"label": labels[i], "score": float(p[i])} for i in order]})
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    for r in results if not args.json else []:
        others = ", ".join(f"{t['label']} {t['score']:.3f}" for t in r["top_k"])
        print(f"{r['input']}\t{r['label'] or 'unknown'}\t{r['score']:.3f}\t[{others}]")


if __name__ == "__main__":
    main()
