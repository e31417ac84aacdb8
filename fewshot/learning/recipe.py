"""Fine-tuning recipes: the ``Recipe`` of a fine-tuning run (read from a TOML file such as
``recipes/omniglot.toml``, every value checked when it is built) and the ``FineTuneResult`` it produces.

Kept apart from the training loop (``fewshot.learning.finetune``) so that reading and checking a recipe
needs neither torch nor timm.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..embedding.fingerprints import DEFAULT_ENCODER

AUGMENTATIONS = ("flip", "rotations", "crop")
UNLABELED_OBJECTIVES = ("dann", "distill")
PRECISIONS = ("auto", "bfloat16", "float32")


@dataclass(frozen=True)
class Recipe:
    """Everything a fine-tuning run needs besides the data; ``Recipe.load(toml)`` reads one from a file."""

    encoder: str = DEFAULT_ENCODER
    stages: tuple[int, ...] | None = None  # intermediate feature stages (None: final features)
    pool: str | int = "avg"
    input_size: int | None = None
    trainable_stages: int = 2  # last network stages (blocks) trained; 0 trains the head only
    head: str = "identity"
    head_params: dict = field(default_factory=dict)
    ways: int = 5
    shots: int = 1
    queries: int = 5
    within_group: bool = False
    episodes: int = 300
    pretrain_steps: int = 0
    batch_size: int = 64
    lr: float = 1e-3  # head (and classifier, discriminator)
    encoder_lr: float = 1e-4
    weight_decay: float = 1e-4
    augment: tuple[str, ...] = ()
    val_fraction: float = 0.2
    val_episodes: int = 100
    val_every: int = 50
    patience: int = 4
    adapt_weight: float = 0.1
    unlabeled: str = "dann"  # objective on adapt_to images: "dann" or "distill" (match the frozen model's features)
    precision: str = "auto"  # trainable blocks' arithmetic while training ("auto": bfloat16 where the CPU has it)
    max_images_per_class: int | None = None  # cap per class (bounds memory and time on big folders)
    guard: bool = True  # keep the frozen encoder when it validates better (False: always the fine-tuned one)
    seed: int = 0

    def __post_init__(self):
        for name in ("trainable_stages", "pretrain_steps"):
            _check_int(name, getattr(self, name), 0)
        for name in ("ways", "shots", "queries", "episodes", "batch_size", "val_episodes", "val_every", "patience"):
            _check_int(name, getattr(self, name), 1)
        bad = [a for a in self.augment if a not in AUGMENTATIONS]
        if bad:
            raise ValueError(f"augment must be a list of {AUGMENTATIONS}, got {list(self.augment)}")
        for name, allowed in (("unlabeled", UNLABELED_OBJECTIVES), ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.max_images_per_class is not None:
            _check_int("max_images_per_class", self.max_images_per_class, 1)
        _check_number("val_fraction", self.val_fraction, 0, upper=1)
        for name in ("lr", "encoder_lr"):
            _check_number(name, getattr(self, name), 0)
        for name in ("weight_decay", "adapt_weight"):
            _check_number(name, getattr(self, name), 0, inclusive=True)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read a recipe TOML file (keys are the field names; see ``recipes/``)."""
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{path}: cannot read the recipe ({e})") from None
        values.pop("description", None)
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, values: dict) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown recipe key(s) {unknown}; known keys: {sorted(known)}")
        values = dict(values)
        for key in ("stages", "augment"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def replace(self, **overrides) -> "Recipe":
        """A copy with the overrides that are not None (command-line options over a recipe file)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["stages"] = list(self.stages) if self.stages is not None else None
        values["augment"] = list(self.augment)
        return values


@dataclass
class FineTuneResult:
    kept: str  # "finetuned" or "frozen" (the guard's choice)
    val_accuracy_finetuned: float
    val_accuracy_frozen: float
    val_accuracy_per_dataset: dict[str, dict[str, float]]  # dataset -> {"finetuned", "frozen"}
    steps_run: int
    stopped_early: bool
    seconds: float
    history: list[dict] = field(default_factory=list)
    stopped_for_time: bool = False  # the deadline ended training (the best validated weights are kept)
    seconds_caching: float = 0.0  # of ``seconds``: running the frozen prefix over every image and view


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_number(name: str, value, low: float, *, upper: float = math.inf, inclusive: bool = False) -> None:
    """``value`` must be a finite number above ``low`` (or equal, if ``inclusive``) and below ``upper``:
    a recipe's ``lr = inf`` or ``lr = nan`` fails here, naming the key, not as a traceback mid-training."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or not ((value >= low if inclusive else value > low) and value < upper):
        bounds = f"{'>=' if inclusive else '>'} {low:g}" + (f" and < {upper:g}" if upper < math.inf else "")
        raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}")

