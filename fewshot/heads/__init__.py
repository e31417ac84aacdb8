"""Heads: small trainable maps from frozen encoder embeddings to a head space, by name.

``create_head("protonet", in_dim, ...)``; ``available_heads()`` lists the names. Each head lives
in its own file with its paper in the docstring; ``_base`` holds the shared contract, the
registry and safe save/load (a directory of JSON + safetensors, never pickle).
"""

from ._base import (
    Head,
    HeadFormatError,
    available_heads,
    create_head,
    load_head,
    register_head,
    save_head,
)
from . import anil, finetuned, identity, maml, metric, protonet  # noqa: F401  (importing registers the heads)

__all__ = ["Head", "HeadFormatError", "available_heads", "create_head", "load_head", "register_head", "save_head"]
