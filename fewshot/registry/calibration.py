"""Honest "unknown": the unknown score, the threshold a registry fits itself, and its temperature.

The unknown score is the top-1 similarity (cosine, or negative squared L2) of a query to its nearest
class prototype. Measured on splits of the Caltech classes (``benchmarks/openset.py``) it separated
registered from unregistered objects as well as or better than every alternative tried (centred
features, margin to the runner-up, nearest stored example, scaling by a class's own or its impostors'
spread, power-normalised features), and unlike a softmax probability it does not change meaning as
classes are added: it depends only on the query and the class it is compared with.

The threshold keeps a target share of known queries (``target_tpr``, default 95%) and is fitted from
the registry's own examples, with no extra data:

* classes with 2+ examples: leave-one-out. Example j of a class is a stand-in for a new query of that
  class; its similarity to the mean of the class's other examples, rescaled to the full prototype
  (cosine: divided by the norm of the mean of all unit examples; L2: the squared distance scaled by
  (n+1)(n-1)/n^2), estimates the score a new photo of the class will get. The thresholds are lower
  prediction bounds of these estimates (an order statistic, or a normal bound when there are few):
  per class where a class has ``PER_CLASS_MIN_EXAMPLES`` or more, pooled otherwise.
* classes with 1 example: similarities between pairs of examples of the same class (classes with 2+),
  which is exactly a 1-shot known score.
* too few of those (``MIN_FIT_SCORES``), e.g. a registry with no class of 2+ examples or without
  stored examples: a quantile of the similarities between different classes' prototypes, at the level
  (``CROSS_CLASS_QUANTILE``) that kept the target share of known queries on 24 Caltech classes
  (``benchmarks/openset.py --tune``, which tests it on the other 27). This one is a prior learnt from
  photos of objects: register a second example of a few classes to replace it with a fit of your own.

The softmax temperature is fitted by the same leave-one-out: the one at which the held-out examples'
mean top-1 probability matches how often they were named right. The fit is stored in the registry's metadata (so it
is saved and checksummed with the registry) together with a signature of the classes and their counts;
``FewShotClassifier`` refits it whenever classes are added, removed or renamed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np

DEFAULT_TARGET_TPR = 0.95
PER_CLASS_MIN_EXAMPLES = 20  # a class's own 5% quantile needs about this many leave-one-out scores
MIN_FIT_SCORES = 3  # fewer leave-one-out (or same-class pair) scores than this: the prior is used instead
MAX_CALIBRATION_CLASSES = 2000  # bigger registries are calibrated on a seeded sample of classes
METADATA_KEY = "unknown"
# Cross-class fallback: target share of known queries kept -> quantile of the similarities between
# different classes' 1-shot prototypes that keeps it (24 Caltech classes, 10- and 24-way registries,
# 20 draws each: ``benchmarks/openset.py --tune``, which also tests it on the other 27 classes).
CROSS_CLASS_QUANTILE = ((0.50, 0.9968), (0.80, 0.9872), (0.90, 0.9756), (0.95, 0.9601), (0.99, 0.9004))
PRIOR_TARGETS = tuple(t for t, _ in CROSS_CLASS_QUANTILE)
PRIOR_KEY = "unknown_prior"  # registry metadata: a domain's own table like CROSS_CLASS_QUANTILE (``fit_prior``)
MAX_TEMPERATURE_ROWS = 1000  # held-out examples the temperature is fitted on
# Bounded work and memory whatever the example counts (a class of 10,000 examples took 28 s and 2 GB
# when every pair was scored; ``benchmarks/calibration_scale.py``): a class with more examples than its
# share is calibrated on a seeded sample of them, its 1-shot pair scores on at most MAX_PAIR_EXAMPLES.
MAX_CLASS_EXAMPLES = 1000  # per class: 1000 leave-one-out scores set a 5% quantile well
MAX_CALIBRATION_EXAMPLES = 50_000  # all classes together (2000 classes: 25 each, enough for their own threshold)
MAX_PAIR_EXAMPLES = 200  # 19,900 pairs per class
SOFTMAX_CANDIDATES = 100  # as FewShotClassifier: probabilities over the 100 nearest classes


@dataclass(frozen=True)
class Calibration:
    """Unknown thresholds (on the top-1 similarity) and softmax temperature fitted for a registry.

    ``threshold`` applies to classes with 2+ examples, ``one_shot_threshold`` to classes with one,
    ``per_class`` overrides both for classes with ``PER_CLASS_MIN_EXAMPLES`` examples or more.
    ``method`` says what the fit rested on: "leave-one-out", "cross-class" (the fallback prior) or
    "none" (an empty registry). ``background_accepted``: share of a background folder's images that
    the threshold accepts as known, where ``fewshot calibrate --background`` measured it.
    """

    target_tpr: float
    threshold: float | None
    one_shot_threshold: float | None
    per_class: dict[str, float] = field(default_factory=dict)
    temperature: float | None = None
    method: str = "none"
    signature: str = ""
    background_accepted: float | None = None

    def threshold_for(self, label: str, count: int) -> float | None:
        """The similarity below which a query nearest to class ``label`` (``count`` examples) is unknown."""
        if label in self.per_class:
            return self.per_class[label]
        return self.one_shot_threshold if count < 2 else self.threshold

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


# -- scores on arrays ---------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def leave_one_out_scores(examples: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Estimated known-query scores against the class's full prototype, one per example (n >= 2)."""
    n = len(examples)
    if n < 2:
        return np.zeros(0)
    if metric == "cosine":
        x = _unit(examples)
        total = x.sum(axis=0)
        others = (total - x) / (n - 1)
        return np.einsum("nd,nd->n", x, others) / np.linalg.norm(total / n)
    x = np.asarray(examples, dtype=np.float64)
    others = (x.sum(axis=0) - x) / (n - 1)
    return -((x - others) ** 2).sum(axis=1) * (n + 1) * (n - 1) / n**2


def pairwise_scores(examples: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Scores between every pair of a class's examples: what a 1-shot class's known queries get
    (n x n work: calibration passes at most ``MAX_PAIR_EXAMPLES``)."""
    if len(examples) < 2:
        return np.zeros(0)
    upper = np.triu_indices(len(examples), 1)
    if metric == "cosine":
        x = _unit(examples)
        return (x @ x.T)[upper]
    x = np.asarray(examples, dtype=np.float64)
    squared = (x**2).sum(axis=1)
    return -(squared[:, None] + squared[None, :] - 2 * x @ x.T)[upper]


def cross_class_scores(prototypes: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Scores between the prototypes of different classes (each pair once)."""
    return pairwise_scores(prototypes, metric)


def _cross_class_quantile(target_tpr: float, prior=CROSS_CLASS_QUANTILE) -> float:
    targets, quantiles = zip(*prior)
    return float(np.interp(target_tpr, targets, quantiles))


def fit_prior(one_shot_scores, cross_scores, targets=PRIOR_TARGETS) -> tuple[tuple[float, float], ...]:
    """A domain's own 1-shot prior (the table ``CROSS_CLASS_QUANTILE`` is for photos): for each target share of
    known queries, the quantile of the cross-class ``cross_scores`` equal to the threshold that keeps that share
    of the same-class ``one_shot_scores`` (both measured on held-out classes of the domain, e.g. by
    ``fewshot adapt``). Store it in a registry's metadata under ``PRIOR_KEY`` for ``calibrate`` to use."""
    known, cross = np.sort(np.asarray(one_shot_scores, float)), np.sort(np.asarray(cross_scores, float))
    if len(known) < MIN_FIT_SCORES or len(cross) < MIN_FIT_SCORES:
        raise ValueError(f"fitting a 1-shot prior needs at least {MIN_FIT_SCORES} same-class and cross-class scores")
    levels = [float(np.searchsorted(cross, _quantile(known, t)) / len(cross)) for t in targets]
    levels = np.minimum.accumulate(np.clip(levels, 0.0, 1.0))  # a higher target never gets a higher threshold
    return tuple((float(t), round(float(q), 6)) for t, q in zip(targets, levels))


def check_prior(prior) -> tuple[tuple[float, float], ...]:
    """``prior`` as a table of (target share, quantile) rows, checked (a stored one may have been edited)."""
    rows = tuple(tuple(row) for row in prior) if isinstance(prior, (list, tuple)) else ()
    fine = len(rows) >= 2 and all(len(r) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      and 0 <= v <= 1 for v in r) for r in rows)
    if not fine or [r[0] for r in rows] != sorted({r[0] for r in rows}):
        raise ValueError(f"a 1-shot prior must be rows of (target share, quantile) in [0, 1], targets ascending; "
                         f"got {prior!r}")
    return tuple((float(t), float(q)) for t, q in rows)


def stored_prior(registry) -> tuple[tuple[float, float], ...]:
    """The registry's own 1-shot prior (set from an adapted model), else the one learnt on photos."""
    saved = registry.metadata.get(PRIOR_KEY)
    if saved is None:
        return CROSS_CLASS_QUANTILE
    try:
        return check_prior(saved)
    except ValueError:  # edited by hand: the photo prior rather than a malformed one
        return CROSS_CLASS_QUANTILE


def _quantile(values: np.ndarray, target_tpr: float) -> float:
    """A threshold that a new value from the same distribution clears with probability ``target_tpr``.

    With enough values, the order statistic at rank (n+1)(1-target) (exact whatever the distribution);
    with fewer (e.g. 10 leave-one-out scores: the plain 5% quantile would keep only ~87%), the normal
    prediction bound mean - t(n-1) * sd * sqrt(1 + 1/n)."""
    n = len(values)
    if n >= 2 / (1.0 - target_tpr):
        return float(np.quantile(values, 1.0 - target_tpr, method="weibull"))
    if n < 2:
        return float(np.min(values))
    bound = np.mean(values) - _student_t(target_tpr, n - 1) * np.std(values, ddof=1) * np.sqrt(1 + 1 / n)
    return float(bound)


def _student_t(p: float, dof: int) -> float:
    """Student t quantile (Cornish-Fisher expansion around the normal's; within 1% for dof >= 5)."""
    z = NormalDist().inv_cdf(p)
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def fit_temperature(examples_by_class: list[np.ndarray], metric: str = "cosine", *, seed: int = 0) -> float | None:
    """The softmax temperature at which the mean top-1 probability of held-out examples (leave-one-out
    against every prototype) equals their accuracy; None when no class has two examples.

    Minimising the negative log likelihood instead drives the temperature to zero (every probability
    1.0) whenever all held-out examples are named right, which is common in small registries; the
    accuracy is Jeffreys' estimate (right + 0.5) / (n + 1) for the same reason. On 25 Caltech classes at
    5 shots both cut the calibration error from 0.092 to ~0.035 (``benchmarks/openset.py``).

    As in prediction, probabilities are normalised over the ``SOFTMAX_CANDIDATES`` nearest classes; at
    most ``MAX_TEMPERATURE_ROWS`` held-out examples (a seeded sample) are used."""
    owners = [c for c, e in enumerate(examples_by_class) if len(e) >= 2]
    if not owners:
        return None
    rows = [(c, j) for c in owners for j in range(len(examples_by_class[c]))]
    if len(rows) > MAX_TEMPERATURE_ROWS:
        picked = np.random.default_rng(seed).choice(len(rows), MAX_TEMPERATURE_ROWS, replace=False)
        rows = [rows[i] for i in np.sort(picked)]
    prototypes, queries, own = _held_out(examples_by_class, rows, metric)
    truth = np.array([c for c, _ in rows])
    if metric == "cosine":
        logits = queries @ prototypes.T
        logits[np.arange(len(rows)), truth] = np.einsum("nd,nd->n", queries, _unit(own))
    else:
        logits = 2 * queries @ prototypes.T - (prototypes**2).sum(axis=1) - (queries**2).sum(axis=1)[:, None]
        logits[np.arange(len(rows)), truth] = -((queries - own) ** 2).sum(axis=1)
    true_logit = logits[np.arange(len(rows)), truth]
    if logits.shape[1] > SOFTMAX_CANDIDATES:  # the nearest classes; the true one replaces the last if not among them
        logits = -np.partition(-logits, SOFTMAX_CANDIDATES - 1, axis=1)[:, :SOFTMAX_CANDIDATES]
        last = logits.argmin(axis=1)
        missing = true_logit < logits[np.arange(len(rows)), last]
        logits[np.flatnonzero(missing), last[missing]] = true_logit[missing]

    predicted_right = logits.max(axis=1) <= true_logit
    # Jeffreys' estimate: n held-out examples all named right do not make the registry infallible.
    accuracy = (predicted_right.sum() + 0.5) / (len(rows) + 1)

    def confidence(temperature: float) -> float:  # mean top-1 probability; falls as temperature grows
        scaled = (logits - logits.max(axis=1, keepdims=True)) / temperature
        return float(np.mean(1.0 / np.exp(scaled).sum(axis=1)))

    low, high = np.log(1e-4), np.log(100.0)
    for _ in range(50):  # bisection on log temperature
        middle = (low + high) / 2
        low, high = (middle, high) if confidence(np.exp(middle)) > accuracy else (low, middle)
    return float(np.exp((low + high) / 2))


def _held_out(examples_by_class: list[np.ndarray], rows: list[tuple[int, int]],
              metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prototypes of every class, held-out examples ``rows`` as (class, index) pairs, the mean of each
    one's class without it), one class at a time: memory for one class, not for all of them."""
    wanted: dict[int, list[int]] = {}
    for i, (c, _) in enumerate(rows):
        wanted.setdefault(c, []).append(i)
    prototypes = np.empty((len(examples_by_class), examples_by_class[rows[0][0]].shape[1]))
    queries, own = np.empty((len(rows), prototypes.shape[1])), np.empty((len(rows), prototypes.shape[1]))
    for c, e in enumerate(examples_by_class):
        x = _unit(e) if metric == "cosine" else np.asarray(e, dtype=np.float64)
        prototypes[c] = x.mean(axis=0)
        if c in wanted:
            picked = [rows[i][1] for i in wanted[c]]
            queries[wanted[c]] = x[picked]
            own[wanted[c]] = (x.sum(axis=0) - x[picked]) / (len(x) - 1)
    return (_unit(prototypes) if metric == "cosine" else prototypes), queries, own


def examples_cap(n_classes: int) -> int:
    """Examples per class that calibration uses (a seeded sample of a bigger class)."""
    share = MAX_CALIBRATION_EXAMPLES // max(n_classes, 1)
    return max(PER_CLASS_MIN_EXAMPLES, min(MAX_CLASS_EXAMPLES, share))


def sample_rows(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a seeded sample of ``cap`` of ``n`` rows (all of them when ``n <= cap``)."""
    return np.arange(n) if n <= cap else np.sort(rng.choice(n, cap, replace=False))


def fit_calibration(labels: list[str], examples_by_class: list[np.ndarray], metric: str = "cosine",
                    target_tpr: float = DEFAULT_TARGET_TPR, *, prototypes: np.ndarray | None = None,
                    signature: str = "", seed: int = 0, prior=CROSS_CLASS_QUANTILE) -> Calibration:
    """Fit thresholds and temperature from each class's example embeddings (``examples_by_class[i]``
    belongs to ``labels[i]``; pass empty arrays and ``prototypes`` where only prototypes are known).

    A class with more than ``examples_cap(len(labels))`` examples is fitted on a sample of them, its
    1-shot pair scores on a sample of ``MAX_PAIR_EXAMPLES``, both drawn with ``seed``. ``prior``: the table of
    the cross-class fallback (``CROSS_CLASS_QUANTILE``, or a domain's own from ``fit_prior``)."""
    check_target(target_tpr)
    if prototypes is None and examples_by_class:
        prototypes = np.stack([e.mean(axis=0) for e in examples_by_class])
    rng, cap = np.random.default_rng(seed), examples_cap(len(examples_by_class))
    examples_by_class = [e if len(e) <= cap else e[sample_rows(len(e), cap, rng)] for e in examples_by_class]
    prior = _cross_class_threshold(prototypes, metric, target_tpr, check_prior(prior))
    loo = [leave_one_out_scores(e, metric) for e in examples_by_class]
    pooled = np.concatenate(loo) if loo else np.zeros(0)
    if len(pooled) < MIN_FIT_SCORES:
        return Calibration(target_tpr, prior, prior, method="cross-class" if prior is not None else "none",
                           signature=signature)
    pairs = np.concatenate([pairwise_scores(e[sample_rows(len(e), MAX_PAIR_EXAMPLES, rng)], metric)
                            for e in examples_by_class])
    one_shot = _quantile(pairs, target_tpr) if len(pairs) >= MIN_FIT_SCORES else prior
    per_class = {label: _quantile(s, target_tpr) for label, s, e in zip(labels, loo, examples_by_class)
                 if len(e) >= PER_CLASS_MIN_EXAMPLES}
    return Calibration(target_tpr, _quantile(pooled, target_tpr), one_shot, per_class,
                       fit_temperature(examples_by_class, metric), "leave-one-out", signature)


def _cross_class_threshold(prototypes: np.ndarray | None, metric: str, target_tpr: float,
                           prior=CROSS_CLASS_QUANTILE) -> float | None:
    """The 1-shot prior: a quantile of the similarities between different classes' prototypes."""
    if prototypes is None or len(prototypes) < 2:
        return None
    return float(np.quantile(cross_class_scores(prototypes, metric), _cross_class_quantile(target_tpr, prior)))


def check_target(target_tpr: float) -> float:
    if isinstance(target_tpr, bool) or not isinstance(target_tpr, (int, float)) or not 0.5 <= target_tpr < 1.0:
        raise ValueError(f"target_tpr must be a share of known queries to keep in [0.5, 1), got {target_tpr!r} "
                         f"(e.g. 0.95)")
    return float(target_tpr)


# -- a registry's calibration --------------------------------------------------------------------
def registry_signature(registry) -> str:
    """Digest of the registry's classes and example counts: a calibration fitted for another set is stale."""
    return hashlib.sha256(json.dumps(list(registry.counts.items()), ensure_ascii=False).encode()).hexdigest()


def calibrate(registry, target_tpr: float | None = None, *, seed: int = 0) -> Calibration:
    """Fit the registry's unknown thresholds and temperature and store them in ``registry.metadata``.

    ``target_tpr`` defaults to the one stored by the last calibration (else 95%). Registries with more
    than ``MAX_CALIBRATION_CLASSES`` classes are calibrated on a sample of them, and classes with many
    examples on a sample of those (see ``fit_calibration``), drawn with ``seed``."""
    if target_tpr is None:
        target_tpr = stored_target(registry)
    labels = registry.classes
    if len(labels) > MAX_CALIBRATION_CLASSES:
        keep = np.sort(np.random.default_rng(seed).choice(len(labels), MAX_CALIBRATION_CLASSES, replace=False))
        labels = [labels[i] for i in keep]
    _, prototypes = registry.prototypes(labels)
    if registry.store_examples:
        rng, cap = np.random.default_rng([seed, 1]), examples_cap(len(labels))
        examples = [registry.examples(label, sample_rows(registry.count(label), cap, rng)) for label in labels]
    else:
        examples = [np.zeros((0, registry.dim), np.float32) for _ in labels]
    calibration = fit_calibration(labels, examples, registry.metric, target_tpr, prototypes=prototypes,
                                  signature=registry_signature(registry), seed=seed, prior=stored_prior(registry))
    registry.metadata[METADATA_KEY] = calibration.to_dict()
    return calibration


def stored_target(registry) -> float:
    """The target of the registry's last calibration (a malformed one is ignored), else the default."""
    saved = registry.metadata.get(METADATA_KEY)
    target = saved.get("target_tpr") if isinstance(saved, dict) else None
    try:
        return check_target(target)
    except ValueError:
        return DEFAULT_TARGET_TPR


def stored_calibration(registry) -> Calibration | None:
    """The calibration stored in the registry if it still fits its classes, else None."""
    saved = registry.metadata.get(METADATA_KEY)
    if not isinstance(saved, dict):
        return None
    try:
        calibration = Calibration.from_dict(saved)
    except TypeError:
        return None
    if not _well_formed(calibration):  # e.g. edited by hand: refit rather than trust it
        return None
    return calibration if calibration.signature == registry_signature(registry) else None


def _well_formed(c: Calibration) -> bool:
    def number(x, optional=True):
        return (x is None and optional) or (isinstance(x, (int, float)) and not isinstance(x, bool)
                                            and np.isfinite(x))

    positive_or_none = c.temperature is None or (number(c.temperature) and c.temperature > 0)
    return (number(c.target_tpr, optional=False) and 0.5 <= c.target_tpr < 1.0 and number(c.threshold)
            and number(c.one_shot_threshold) and positive_or_none
            and isinstance(c.per_class, dict) and all(number(v, optional=False) for v in c.per_class.values())
            and isinstance(c.signature, str) and number(c.background_accepted))


def current_calibration(registry) -> Calibration:
    """The stored calibration, refitted first if the classes changed since it was fitted."""
    return stored_calibration(registry) or calibrate(registry)


def accepted_share(calibration: Calibration, similarities: np.ndarray, labels: list[str],
                   counts: list[int]) -> float:
    """Share of queries (top-1 ``similarities`` to classes ``labels`` with ``counts`` examples) accepted."""
    thresholds = np.array([calibration.threshold_for(lab, n) for lab, n in zip(labels, counts)], dtype=float)
    return float(np.mean(np.asarray(similarities) >= thresholds))
