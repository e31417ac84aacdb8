"""Shared machinery of the heads that adapt to each support set with learn2learn (ANIL, MAML).

Body = the learned projection (``fewshot.learning.heads._projection``); classifier = Linear(out_dim, ways).
``episode_logits`` clones the adapted part with ``learn2learn.algorithms.MAML``, takes
``inner_steps`` gradient steps of cross-entropy on the support set and returns the query logits.
It enables gradients inside, so it also works under ``torch.no_grad()`` / ``torch.inference_mode()``
at evaluation (then with first-order steps and detached output). Episodes with a different number
of ways than the classifier has rows use its rows cyclically (row ``i % ways``) as the initial
per-class weights: labels are permuted at random in every training episode, so the rows are
interchangeable. ``forward``/``transform`` return the body's unit-length projection (metric cosine),
so a trained ANIL/MAML head can also back a prototype registry.

learn2learn is imported lazily: ``import fewshot`` and the other heads never need it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...checks import check_int
from ..base import MAX_INNER_STEPS, MAX_WAYS, seeded
from .head import Head
from ._projection import build_projection


class _Net(torch.nn.Module):
    """body -> classifier, the module MAML adapts as a whole (not registered in the head)."""

    def __init__(self, body, classifier):
        super().__init__()
        self.body, self.classifier = body, classifier

    def forward(self, x):
        return self.classifier(self.body(x))


def _usable(x) -> torch.Tensor:
    """A tensor autograd can use, even if it was created under torch.inference_mode()."""
    x = torch.as_tensor(x)
    return x.clone() if x.is_inference() else x


def _expand_rows(linear: torch.nn.Module, ways: int) -> None:
    """Give a *cloned* Linear one (differentiable) row per way, reusing its rows cyclically."""
    rows = linear.weight.shape[0]
    if rows != ways:
        idx = torch.arange(ways, device=linear.weight.device) % rows
        linear._parameters["weight"] = linear.weight[idx]
        linear._parameters["bias"] = linear.bias[idx]


class AdaptiveHead(Head):
    metric = "cosine"
    adapts = True
    adapt_body: bool = False  # MAML: True (all weights adapt); ANIL: False (classifier only)

    def __init__(self, in_dim: int, *, in_shape=None, seed: int = 0, arch: str = "mlp", hidden: int = 256,
                 out_dim: int = 64, norm: str = "layer", dropout: float = 0.0, channels: int = 64, blocks: int = 2,
                 pool_size: int = 2, ways: int = 20, inner_steps: int = 5, inner_lr: float = 0.1,
                 first_order: bool = False):
        from ...evaluation.learn2learn import import_learn2learn

        import_learn2learn(f"the {self.name!r} head")  # fail now, with the fix, if it is missing
        super().__init__(in_dim, in_shape=in_shape, seed=seed, arch=arch, hidden=hidden, out_dim=out_dim,
                         norm=norm, dropout=dropout, channels=channels, blocks=blocks, pool_size=pool_size,
                         ways=ways, inner_steps=inner_steps, inner_lr=inner_lr, first_order=bool(first_order))
        self.ways = check_int(ways, "ways", high=MAX_WAYS)
        self.inner_steps = check_int(inner_steps, "inner_steps", low=0, high=MAX_INNER_STEPS)
        if not isinstance(inner_lr, (int, float)) or not 0 < inner_lr < float("inf"):
            raise ValueError(f"inner_lr must be a positive number, got {inner_lr!r}")
        self.inner_lr, self.first_order = float(inner_lr), bool(first_order)
        self.out_dim = int(out_dim)
        with seeded(self.seed):
            self.body = build_projection(self.in_dim, self.in_shape, arch=arch, hidden=hidden, out_dim=out_dim,
                                         norm=norm, dropout=dropout, channels=channels, blocks=blocks,
                                         pool_size=pool_size)
            self.classifier = torch.nn.Linear(self.out_dim, self.ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(x), dim=1)

    def episode_logits(self, support, support_labels, query, ways: int, *, steps: int | None = None):
        """Adapt a clone on the support set (``steps`` overrides ``inner_steps``; 0 = no adaptation)
        and return the query logits ``(n_query, ways)``."""
        from ...evaluation.learn2learn import import_learn2learn

        l2l = import_learn2learn(f"the {self.name!r} head")
        steps = self.inner_steps if steps is None else check_int(steps, "steps", low=0)
        ways = check_int(ways, "ways")
        outer_grad = torch.is_grad_enabled()
        # Second-order meta-gradients only where they are wanted: training with grad, not first_order.
        first_order = self.first_order or not (outer_grad and self.training)
        with torch.inference_mode(False), torch.enable_grad():
            support, query = _usable(support), _usable(query)
            labels = _usable(support_labels).long()
            if self.adapt_body:
                learner = l2l.algorithms.MAML(_Net(self.body, self.classifier), lr=self.inner_lr,
                                              first_order=first_order)
                net = learner.clone()
                _expand_rows(net.module.classifier, ways)
                for _ in range(steps):
                    net.adapt(F.cross_entropy(net(support), labels))
                logits = net(query)
            else:
                z = self.body(torch.cat([support, query]))
                z_support, z_query = z[: len(support)], z[len(support):]
                learner = l2l.algorithms.MAML(self.classifier, lr=self.inner_lr, first_order=first_order)
                clf = learner.clone()
                _expand_rows(clf.module, ways)
                for _ in range(steps):
                    clf.adapt(F.cross_entropy(clf(z_support), labels))
                logits = clf(z_query)
        return logits if outer_grad else logits.detach()
