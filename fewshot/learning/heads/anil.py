"""ANIL head: Almost No Inner Loop, MAML that adapts only the classifier per support set.

Raghu, Raghu, Bengio, Vinyals. "Rapid Learning or Feature Reuse? Towards Understanding the
Effectiveness of MAML." ICLR 2020.

Body = learned projection (meta-trained in the outer loop only); classifier = Linear(out_dim, ways),
adapted with ``inner_steps`` steps of SGD (``inner_lr``) on the support set through
``learn2learn.algorithms.MAML`` (``first_order`` for first-order meta-gradients). See
``fewshot.learning.heads._adaptive`` for evaluation, other numbers of ways and the registry use.
"""

from __future__ import annotations

from ._adaptive import AdaptiveHead
from ..base import register_head


@register_head
class ANILHead(AdaptiveHead):
    name = "anil"
    adapt_body = False
