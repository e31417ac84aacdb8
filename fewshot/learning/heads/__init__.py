"""Heads: small trainable maps from frozen encoder embeddings to a head space, by name.

``create_head("protonet", in_dim, ...)``; ``available_heads()`` lists the names. Each head lives
in its own file with its paper in the docstring; ``fewshot.learning.base`` holds the shared contract
(``HeadBase``), the registry and safe save/load (a directory of JSON + safetensors, never pickle), and
``head`` the public ``Head`` class (the contract plus ``fit``). Importing this package registers every head.
"""

from ..base import HeadBase as HeadBase
from ..base import HeadFormatError as HeadFormatError
from ..base import available_heads as available_heads
from ..base import create_head as create_head
from ..base import load_head as load_head
from ..base import register_head as register_head
from ..base import save_head as save_head
from . import anil, finetuned, identity, maml, metric, protonet, whitening  # noqa: F401  (importing registers the heads)
from .head import Head as Head

__all__ = ["Head", "HeadBase", "HeadFormatError", "available_heads", "create_head", "load_head", "register_head",
           "save_head"]
