"""The time budget of ``fewshot adapt``: parsing "10m", and the deadlines of its phases."""

from __future__ import annotations

import re
import time

_UNITS = {"s": 1, "m": 60, "h": 3600}
MAX_BUDGET_SECONDS = 7 * 24 * 3600

# Where each phase must end, as a share of the budget: cheap candidates first, and the costly ones (fine-tuning)
# get what is left. A phase that ends early leaves its time to the next. "refine" (whitening on the fine-tuned
# features, seconds) may use what fine-tuning's last validation ran over.
PHASE_ENDS = {"features": 0.35, "statistics": 0.45, "head": 0.55, "finetune": 0.75, "unlabeled": 0.95, "refine": 0.97}


def parse_budget(text: str | float | int) -> float:
    """Seconds from "90s", "10m", "1.5h" or a plain number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
        if not match:
            raise ValueError(f"budget must be a duration such as 90s, 10m or 1h, got {text!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not 0 < seconds <= MAX_BUDGET_SECONDS:
        raise ValueError(f"budget must be more than 0 s and at most a week, got {text!r}")
    return seconds


class Budget:
    """A wall-clock budget started at construction (``time.monotonic``), with per-phase deadlines."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def deadline(self, phase: str) -> float:
        """The monotonic time by which ``phase`` must end."""
        return self.start + PHASE_ENDS[phase] * self.seconds

    def left(self, phase: str) -> float:
        """Seconds left before ``phase``'s deadline (negative when past it)."""
        return self.deadline(phase) - time.monotonic()
