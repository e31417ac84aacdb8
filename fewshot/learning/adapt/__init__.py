"""``fewshot adapt``: learn a user's domain from a few labelled classes, never worse than the frozen default.

The labelled classes are split (seeded, class-disjoint, groups together) into training and validation classes.
Candidate transfers are tried cheapest first within a time budget (``tuning``): feature choice (layout,
resolution, encoder), domain statistics (centring, whitening, AdaBN), a ProtoNet head, fine-tuning of
the top blocks, and with unlabelled images, adaptation on them. Each is scored on the same validation episodes
(1- and 5-shot accuracy, 1-shot open-set AUROC, ``validation``) and kept only where it wins; the final choice
must beat the frozen default beyond noise (a paired 95% CI), else the frozen default is returned. The chosen
model also carries the domain's own 1-shot unknown prior, fitted on the validation classes.
"""

from .budget import parse_budget
from .report import format_report, plot_report
from .search import AdaptResult, adapt

__all__ = ["AdaptResult", "adapt", "format_report", "parse_budget", "plot_report"]
