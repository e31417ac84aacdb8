"""Evaluation: episodic accuracy with confidence intervals, open-set (unknown) evaluation, shots sweeps,
encoder comparison, the metrics behind them and learn2learn interop.

Modules: ``evaluate`` (episodes -> accuracy, confusion), ``openset`` (unknown detection: AUROC, FPR, calibration
error), ``sweep`` (accuracy against shots on a folder), ``compare`` (rank encoders), ``metrics``, ``learn2learn``.
Imports embedding, data and registry (the unknown calibration); heads come in as objects, never imported.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# Public name -> the module defining it, imported on first use (PEP 562): importing one module of this
# stage does not import the others (nor torch, where they need it).
_EXPORTS = {
    "EvaluationResult": "evaluate",
    "confidence_interval": "evaluate",
    "evaluate_batch": "evaluate",
    "evaluate_episodes": "evaluate",
    "provenance": "evaluate",
    "OpenSetResult": "openset",
    "evaluate_open_set": "openset",
    "SweepResult": "sweep",
    "shots_sweep": "sweep",
    "EncoderScore": "compare",
    "compare_encoders": "compare",
    "auroc": "metrics",
    "expected_calibration_error": "metrics",
    "fpr_at_tpr": "metrics",
    "precision_at_recall": "metrics",
    "threshold_at_tpr": "metrics",
    "as_task_dataset": "learn2learn",
    "import_learn2learn": "learn2learn",
    "to_meta_dataset": "learn2learn",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # static analysers and IDEs see the real imports
    from .evaluate import (
        EvaluationResult,
        confidence_interval,
        evaluate_batch,
        evaluate_episodes,
        provenance,
    )
    from .openset import OpenSetResult, evaluate_open_set
    from .sweep import SweepResult, shots_sweep
    from .compare import EncoderScore, compare_encoders
    from .metrics import (
        auroc,
        expected_calibration_error,
        fpr_at_tpr,
        precision_at_recall,
        threshold_at_tpr,
    )
    from .learn2learn import as_task_dataset, import_learn2learn, to_meta_dataset

__all__ = [
    "EncoderScore",
    "EvaluationResult",
    "OpenSetResult",
    "SweepResult",
    "as_task_dataset",
    "auroc",
    "compare_encoders",
    "confidence_interval",
    "evaluate_batch",
    "evaluate_episodes",
    "evaluate_open_set",
    "expected_calibration_error",
    "fpr_at_tpr",
    "import_learn2learn",
    "precision_at_recall",
    "provenance",
    "shots_sweep",
    "threshold_at_tpr",
    "to_meta_dataset",
]
