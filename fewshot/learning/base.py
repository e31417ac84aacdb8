"""The contract every head follows, the registry of heads by name, and safe save/load.

A head maps frozen encoder embeddings ``(n, in_dim)`` to head-space vectors ``(n, out_dim)`` that
are compared with its ``metric`` ("cosine" or "l2" = squared Euclidean, the registry's metrics).
Heads are trained episodically (``Head.fit`` -> ``fewshot.learning.train.train_head``); ``episode_logits`` is
the differentiable nearest-prototype classifier used for training and episodic evaluation. ``Head`` (in
``fewshot.learning.heads.head``) is ``HeadBase`` plus ``fit``: the training loop needs this module, ``fit``
needs the training loop, so this module sits below both and imports neither.

On disk a head is a directory: ``config.json`` (the config that rebuilds it, a format version, the
sha256 of the weights and the head's free-form JSON ``metadata``) and ``weights.safetensors``.
Loading never unpickles anything: it reads the safetensors header first and refuses weights whose
tensors, or file size, are not what the config implies (checked on a meta-device skeleton, whose size
has a limit), then checks the sha256s before parsing the weights and loads the state dict strictly.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import check_int
from ..errors import HeadFormatError
from ..files import honour_umask, open_regular

METRICS = ("cosine", "l2")
FORMAT_NAME = "fewshot-head"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 2 << 30  # a fine-tuned EfficientNet-Lite2 head is ~25 MB; ViT-L/16 would be 1.2 GB
MAX_HEADER_BYTES = 1 << 22  # the safetensors JSON header: ~100 bytes per tensor
DEFAULT_COSINE_SCALE = 10.0  # logits = scale * cosine for heads without a learned temperature

_REGISTRY: dict[str, type["HeadBase"]] = {}


# ---------------------------------------------------------------- helpers shared by the heads

@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's global RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def prototype_logits(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, ways: int,
                     metric: str, scale: torch.Tensor | float = DEFAULT_COSINE_SCALE) -> torch.Tensor:
    """Nearest-prototype logits ``(n_query, ways)`` from head-space vectors (differentiable).

    Prototypes are per-label means of the support vectors (of unit vectors for cosine, like the
    registry). ``l2``: ``-squared Euclidean distance``; ``cosine``: ``scale * cosine similarity``.
    """
    labels = torch.as_tensor(support_labels, device=support.device).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= ways):
        raise ValueError(f"support labels must be episode labels in 0..{ways - 1}")
    onehot = F.one_hot(labels, ways).to(support.dtype)  # (n_s, ways)
    counts = onehot.sum(0)
    if (counts == 0).any():
        raise ValueError(f"every one of the {ways} ways needs at least one support example")
    if metric == "cosine":
        support, query = F.normalize(support, dim=1), F.normalize(query, dim=1)
    prototypes = onehot.t() @ support / counts[:, None]
    if metric == "cosine":
        return scale * (query @ F.normalize(prototypes, dim=1).t())
    if metric == "l2":
        return -torch.cdist(query, prototypes).pow(2)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _state_bytes(module: torch.nn.Module) -> bytes:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return save(state)


# Upper bounds of sizes a head's config may ask for: far beyond any useful head, yet small enough
# that a hostile config.json cannot make fewshot allocate without end or loop for ever.
MAX_IN_DIM = 2**22  # flattened feature maps: e.g. 1,400 channels x 16 x 16 is 358,400
MAX_WIDTH = 2**16  # hidden, out_dim, channels
MAX_INNER_STEPS = 1000
MAX_WAYS = 10**5
MAX_SEED = 2**63 - 1


def check_choice(value, what: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{what} must be one of {tuple(choices)}, got {value!r}")
    return value


# ---------------------------------------------------------------- the contract

class HeadBase(torch.nn.Module):
    """Base class of every head: see the module docstring. Subclasses set ``name`` and ``metric``,
    call ``super().__init__(in_dim, in_shape=..., seed=..., **params)`` with *all* their
    constructor parameters (they become ``config``), build their layers inside ``seeded(seed)``
    and implement ``forward``."""

    name: ClassVar[str] = ""
    metric: str = "cosine"
    adapts: ClassVar[bool] = False  # adapts per support set (MAML/ANIL): evaluate with episode_logits
    episodic: ClassVar[bool] = True  # trained on episodes (False: fit computes statistics only)
    out_dim: int

    def __init__(self, in_dim: int, *, in_shape: tuple[int, int, int] | None = None, seed: int = 0, **params):
        super().__init__()
        self.in_dim = check_int(in_dim, "in_dim", high=MAX_IN_DIM)
        if in_shape is not None:
            if (not isinstance(in_shape, (tuple, list)) or len(in_shape) != 3
                    or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in in_shape)):
                raise ValueError(f"in_shape must be (C, H, W) positive integers, got {in_shape!r}")
            in_shape = tuple(int(v) for v in in_shape)
            if math.prod(in_shape) != self.in_dim:
                raise ValueError(f"in_shape {in_shape} holds {math.prod(in_shape)} values but in_dim is "
                                 f"{self.in_dim}; the input must be the flattened (C, H, W) map, C-major")
        self.in_shape = in_shape
        self.seed = check_int(seed, "seed", low=0, high=MAX_SEED)
        try:
            self._params = json.loads(canonical_json(params))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.name} head parameters must be JSON-serialisable: {e}") from None
        # Free-form JSON-able notes saved with the head (e.g. the encoder fingerprint it was trained on,
        # training settings); not part of ``config`` or ``fingerprint``.
        self.metadata: dict = {}

    # -- identity of the head
    @property
    def config(self) -> dict:
        """JSON-able description that rebuilds the head (with ``create_head(**config)``)."""
        return {"name": self.name, "in_dim": self.in_dim,
                "in_shape": list(self.in_shape) if self.in_shape is not None else None, **self._params}

    @property
    def fingerprint(self) -> dict:
        """``{"name", "sha256"}`` over the canonical JSON config and the safetensors weights."""
        digest = hashlib.sha256(canonical_json(self.config).encode())
        digest.update(_state_bytes(self))
        return {"name": self.name, "sha256": digest.hexdigest()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "name")

    # -- the model
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def carried_encoder(self):
        """The encoder this head carries in its own weights (fine-tuned models), or None: the encoder
        is then re-created from ``metadata["encoder"]``."""
        return None

    def cosine_scale(self) -> torch.Tensor | float:
        """Multiplier of cosine similarities in ``episode_logits`` (heads may learn it)."""
        return DEFAULT_COSINE_SCALE

    def episode_logits(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                       ways: int) -> torch.Tensor:
        """Logits ``(n_query, ways)`` of the queries against the support set's class prototypes.

        Support and query go through ``forward`` together (one batch, as in Snell et al.)."""
        z = self(torch.cat([support, query]))
        return prototype_logits(z[: len(support)], support_labels, z[len(support):], ways, self.metric,
                                self.cosine_scale())

    def prepare_training(self, n_classes: int) -> None:
        """Called by ``train_head`` before training on data with ``n_classes`` classes (check or set up)."""

    def training_step(self, support, support_labels, query, query_labels, ways: int, classes=None):
        """``(loss, logits or None)`` for one episode; ``classes`` are the episode's global class ids
        (dataset-wide label codes), for losses that need them. Default: prototypical cross-entropy."""
        logits = self.episode_logits(support, support_labels, query, ways)
        return F.cross_entropy(logits, torch.as_tensor(query_labels).long()), logits

    def loss(self, support, support_labels, query, query_labels, ways: int, classes=None) -> torch.Tensor:
        """Training loss of one episode (default: cross-entropy of ``episode_logits``)."""
        return self.training_step(support, support_labels, query, query_labels, ways, classes)[0]

    # -- scikit-learn-like use (``fit`` is added by ``Head``, fewshot.learning.heads.head)
    def transform(self, features, batch_size: int = 4096) -> np.ndarray:
        """Head-space vectors ``(N, out_dim)`` float32 of embeddings ``(N, in_dim)`` (eval mode, no grad)."""
        x = np.asarray(features, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"{self.name} head expects features of shape (N, {self.in_dim}), got {x.shape}")
        batch_size = check_int(batch_size, "batch_size")
        was_training = self.training
        self.eval()
        try:
            out = np.empty((len(x), self.out_dim), dtype=np.float32)
            with torch.no_grad():
                for start in range(0, len(x), batch_size):
                    chunk = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size]))
                    out[start:start + len(chunk)] = self(chunk).float().numpy()
            return out
        finally:
            self.train(was_training)


# ---------------------------------------------------------------- registry of heads

def register_head(cls: type[HeadBase]) -> type[HeadBase]:
    """Class decorator: make ``cls`` available to ``create_head(cls.name, ...)``."""
    if not (isinstance(cls, type) and issubclass(cls, HeadBase)) or not cls.name:
        raise TypeError("register_head expects a Head subclass with a non-empty `name`")
    _REGISTRY[cls.name] = cls
    return cls


def available_heads() -> list[str]:
    return sorted(_REGISTRY)


def create_head(name: str, in_dim: int, **params) -> HeadBase:
    """Build a head by name, e.g. ``create_head("protonet", 1280, out_dim=128)``."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown head {name!r}; available heads: {', '.join(available_heads())}")
    accepted = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"{name} head got unknown parameter(s) {unknown}; it accepts {accepted}")
    return cls(in_dim, **params)


# ---------------------------------------------------------------- save / load

def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_head(head: HeadBase, path) -> Path:
    """Save ``head`` as the directory ``path`` (config.json + weights.safetensors), atomically.

    The head is written to a temporary sibling directory and renamed into place; an existing
    saved head at ``path`` is replaced, anything else there is refused."""
    if not isinstance(head, HeadBase):
        raise TypeError(f"save_head expects a Head, got {type(head).__name__}")
    path = Path(path)
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / CONFIG_FILE).is_file())):
        raise FileExistsError(f"{path} exists and is not a saved head; choose another path or remove it")
    if not isinstance(head.metadata, dict):
        raise ValueError(f"head.metadata must be a dict, got {type(head.metadata).__name__}")
    try:
        metadata = json.loads(canonical_json(head.metadata))
    except (TypeError, ValueError) as e:
        raise ValueError(f"head.metadata must be JSON-serialisable to be saved: {e}") from None
    weights = _state_bytes(head)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": head.config,
            "weights_sha256": hashlib.sha256(weights).hexdigest(), "fingerprint": head.fingerprint,
            "metadata": metadata}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        honour_umask(tmp, directory=True)
        _fsync_write(tmp / WEIGHTS_FILE, weights)
        _fsync_write(tmp / CONFIG_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "head")
        os.replace(tmp, path)
    except BaseException:
        if old is not None and (old / "head").exists() and not path.exists():
            os.replace(old / "head", path)  # put the previous head back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):  # make the rename durable where the platform allows
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def _read_limited(path: Path, limit: int) -> bytes:
    if not path.is_file():
        raise HeadFormatError(f"{path}: missing; a saved head is a directory with {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE} written by save_head")
    size = path.stat().st_size
    if size > limit:
        raise HeadFormatError(f"{path}: {size} bytes is more than the {limit} allowed")
    return path.read_bytes()


def _reject_constant(value):
    raise ValueError(f"non-finite number {value}")


# safetensors' dtype names of the torch dtypes a head's state dict may hold
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _implied_tensors(skeleton: HeadBase, config_path: Path) -> dict[str, dict]:
    """The tensors (safetensors dtype, shape, bytes) a head's config implies, from its meta-device
    skeleton; a config asking for more than MAX_WEIGHTS_BYTES in all is refused."""
    tensors = {key: {"dtype": _SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype)), "shape": list(t.shape),
                     "bytes": t.numel() * t.element_size()} for key, t in skeleton.state_dict().items()}
    total = sum(t["bytes"] for t in tensors.values())
    if total > MAX_WEIGHTS_BYTES:
        raise HeadFormatError(f"{config_path}: the {skeleton.name!r} head in it needs {total} bytes of weights, "
                              f"more than the {MAX_WEIGHTS_BYTES} allowed; the config is corrupt or was forged")
    return tensors


def _misfits(header: dict, tensors: dict[str, dict]) -> list[str]:
    """Names of tensors that a safetensors header lacks, adds, or declares with another dtype, shape or size."""
    header = {key: value for key, value in header.items() if key != "__metadata__"}
    problems = sorted(set(header) ^ set(tensors))
    return problems + [key for key in sorted(set(header) & set(tensors)) if not _declares(header[key], tensors[key])]


def _declares(entry, want: dict) -> bool:
    """Whether a safetensors header entry declares the tensor ``want`` (dtype, shape and byte span)."""
    if not isinstance(entry, dict):
        return False
    offsets = entry.get("data_offsets")
    return (entry.get("dtype") == want["dtype"] and entry.get("shape") == want["shape"]
            and isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets)
            and offsets[1] - offsets[0] == want["bytes"])


def _read_weights(path: Path, tensors: dict[str, dict], head: str) -> bytes:
    """The bytes of a weights file, read only once its safetensors header (8-byte length + JSON, capped)
    declares exactly ``tensors`` and its size is what they need: a small or sparse file declaring a huge
    tensor is refused before anything large is read or hashed."""
    f = open_regular(path) if path.exists() else None
    if f is None:
        raise HeadFormatError(f"{path}: missing or not a file; a saved head is a directory with {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE} written by save_head")
    with f:
        size = os.fstat(f.fileno()).st_size
        header_len = int.from_bytes(f.read(8), "little")
        if size < 8 or header_len > min(MAX_HEADER_BYTES, size - 8):
            raise HeadFormatError(f"{path}: not a valid safetensors file (no readable header); save the head again")
        try:
            header = json.loads(f.read(header_len).decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as e:
            raise HeadFormatError(f"{path}: not a valid safetensors file (header: {e}); save the head again") from None
        problems = _misfits(header, tensors) if isinstance(header, dict) else ["(header is not a JSON object)"]
        needed = 8 + header_len + sum(t["bytes"] for t in tensors.values())
        if problems or size != needed:
            detail = f"missing, unexpected or mis-shaped: {problems[:5]}" if problems else \
                f"{size} bytes where its tensors need {needed}"
            raise HeadFormatError(f"{path}: weights do not fit the {head!r} head in {CONFIG_FILE} ({detail}); the "
                                  "files were changed or mixed up after saving: save the head again")
        f.seek(0)
        return f.read(size)


def _check_config_sum(config_path: Path, meta: dict, weights: bytes) -> None:
    """The saved fingerprint covers the config and the weights: an edited config (a flipped bit, a
    hand edit) is refused before a head is built from it (only its meta-device skeleton is). Sizes are
    checked against limits anyway, since anyone can recompute a checksum."""
    fingerprint = meta.get("fingerprint")
    try:
        digest = hashlib.sha256(canonical_json(meta["config"]).encode())
    except (TypeError, ValueError) as e:
        raise HeadFormatError(f"{config_path}: config is not plain JSON ({e})") from None
    digest.update(weights)
    if not isinstance(fingerprint, dict) or fingerprint.get("sha256") != digest.hexdigest():
        raise HeadFormatError(f"{config_path}: checksum mismatch: the config was changed after saving "
                              "(or the file is corrupt); save the head again")


def load_head(path) -> HeadBase:
    """Load a head saved by ``save_head``; raises ``HeadFormatError`` naming the bad file."""
    path = Path(path)
    if not path.is_dir():
        raise HeadFormatError(f"{path}: not a directory; a saved head is a directory written by save_head")
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    try:
        meta = json.loads(_read_limited(config_path, MAX_CONFIG_BYTES).decode("utf-8"),
                          parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        if isinstance(e, HeadFormatError):
            raise
        raise HeadFormatError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise HeadFormatError(f"{config_path}: not a fewshot head config (expected format {FORMAT_NAME!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise HeadFormatError(f"{config_path}: format version {meta.get('format_version')!r} is not supported "
                              f"(this fewshot reads version {FORMAT_VERSION}); upgrade fewshot")
    config, expected, metadata = meta.get("config"), meta.get("weights_sha256"), meta.get("metadata", {})
    if not isinstance(config, dict) or not isinstance(expected, str) or not isinstance(metadata, dict):
        raise HeadFormatError(f"{config_path}: 'config', 'weights_sha256' or 'metadata' is missing or malformed")
    config = dict(config)
    name, in_dim = config.pop("name", None), config.pop("in_dim", None)
    if name not in _REGISTRY:
        raise HeadFormatError(f"{config_path}: unknown head {name!r}; available heads: "
                              f"{', '.join(available_heads())}")
    try:
        with torch.device("meta"):  # shapes only: a hostile config cannot make us allocate memory
            skeleton = create_head(name, in_dim, **config)
    except Exception as e:  # noqa: BLE001 - whatever a crafted config provokes, it is a format error
        raise HeadFormatError(f"{config_path}: cannot rebuild the {name!r} head: {e}") from None
    weights = _read_weights(weights_path, _implied_tensors(skeleton, config_path), name)
    if hashlib.sha256(weights).hexdigest() != expected:
        raise HeadFormatError(f"{weights_path}: sha256 does not match {CONFIG_FILE}; the file is corrupt or "
                              "was modified after saving")
    _check_config_sum(config_path, meta, weights)
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        state = load(weights)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise HeadFormatError(f"{weights_path}: not a valid safetensors file ({e})") from None
    head = create_head(name, in_dim, **config)
    head.load_state_dict(state, strict=True)
    head.metadata = metadata
    head.eval()
    return head
