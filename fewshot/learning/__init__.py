"""Learning: heads trained episodically on frozen embeddings, and fine-tuning of the encoder's last stages.

Modules: ``base`` (the head contract ``HeadBase``, the registry of heads, safe save/load), ``heads/`` (one file
per head; ``Head`` = the contract plus ``fit``), ``train`` (episodic training with validation and early
stopping), ``finetune`` (fine-tuning with a head; recipes). Imports embedding, data and evaluation (whose
episodic scorer validates training); never registries.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# Public name -> the module defining it, imported on first use (PEP 562): importing one module of this
# stage does not import the others (nor torch, where they need it).
_EXPORTS = {
    "HeadBase": "base",
    "available_heads": "base",
    "create_head": "base",
    "load_head": "base",
    "register_head": "base",
    "save_head": "base",
    "Head": "heads",
    "TrainResult": "train",
    "train_head": "train",
    "FineTuneResult": "finetune",
    "Recipe": "finetune",
    "finetune": "finetune",
    "AdaptResult": "adapt",
    "adapt": "adapt",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # static analysers and IDEs see the real imports
    from .base import HeadBase, available_heads, create_head, load_head, register_head, save_head
    from .heads import Head
    from .train import TrainResult, train_head
    from .finetune import FineTuneResult, Recipe, finetune
    from .adapt import AdaptResult, adapt

__all__ = [
    "AdaptResult",
    "FineTuneResult",
    "Head",
    "HeadBase",
    "Recipe",
    "adapt",
    "TrainResult",
    "available_heads",
    "create_head",
    "finetune",
    "load_head",
    "register_head",
    "save_head",
    "train_head",
]
