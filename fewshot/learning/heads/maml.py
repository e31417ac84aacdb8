"""MAML head: Model-Agnostic Meta-Learning over all head weights.

Finn, Abbeel, Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks."
ICML 2017.

Body = learned projection, classifier = Linear(out_dim, ways); per episode a clone of both is
adapted with ``inner_steps`` steps of SGD (``inner_lr``) on the support set through
``learn2learn.algorithms.MAML`` and scores the queries; the outer loop learns the initialisation
(second-order unless ``first_order=True``). See ``fewshot.learning.heads._adaptive`` for evaluation, other
numbers of ways and the registry use. Defaults use LayerNorm, which does not depend on the batch.
"""

from __future__ import annotations

from ._adaptive import AdaptiveHead
from ..base import register_head


@register_head
class MAMLHead(AdaptiveHead):
    name = "maml"
    adapt_body = True
