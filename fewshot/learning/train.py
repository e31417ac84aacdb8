"""Episodic training of heads on cached (frozen) embeddings.

Everything runs on arrays already in memory: features become one tensor once, each episode indexes
it. Episodes come from ``fewshot.data.episodes.EpisodeSampler`` and torch's RNG (dropout) is seeded
from the same ``seed`` inside a forked RNG state, so a run is reproducible and leaves the caller's
RNG alone. Adam with a cosine learning-rate schedule; validation on held-out classes over a fixed
set of episodes drawn once; early stopping with ``patience``; the best weights are restored.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.episodes import EpisodeSampler
from ..evaluation.evaluate import evaluate_episodes
from .base import HeadBase


@dataclass
class TrainResult:
    best_val_accuracy: float | None  # None without validation data
    best_episode: int  # episodes run when the kept weights were reached
    episodes_run: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)  # {"episode", "train_loss", "train_accuracy", "val_accuracy"}
    # The same validation episodes scored on raw features (cosine nearest prototype) and on the untrained
    # head: the bar a head must clear, and where it started (None without validation data).
    raw_val_accuracy: float | None = None
    initial_val_accuracy: float | None = None


def _features(x, in_dim: int, what: str) -> torch.Tensor:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != in_dim or len(arr) == 0:
        raise ValueError(f"{what} must have shape (N, {in_dim}) to fit the head, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contain NaN or infinity")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _codes(labels, n: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{what} must hold one label per feature row: expected shape ({n},), got {labels.shape}")
    return np.unique(labels, return_inverse=True)[1].reshape(-1)


def _check_positive(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _episode_tensors(episode):
    return (torch.from_numpy(np.asarray(episode.support, dtype=np.int64)),
            torch.from_numpy(np.asarray(episode.support_labels, dtype=np.int64)),
            torch.from_numpy(np.asarray(episode.query, dtype=np.int64)),
            torch.from_numpy(np.asarray(episode.query_labels, dtype=np.int64)))


def _validate_raw(x: torch.Tensor, labels: np.ndarray, episodes: list) -> float:
    """Mean query accuracy of raw features (cosine nearest prototype) over the same episodes."""
    return evaluate_episodes(x.numpy(), labels, episodes, metric="cosine", progress=False).accuracy


def _validate(head: HeadBase, x: torch.Tensor, labels: np.ndarray, episodes: list) -> float:
    """Mean query accuracy of ``head`` over fixed ``episodes`` (eval mode)."""
    head.eval()
    with torch.no_grad():
        if not head.adapts and type(head).episode_logits is HeadBase.episode_logits:
            # Default nearest-prototype logits: embed every item once, then score all episodes batched.
            z = torch.cat([head(chunk) for chunk in x.split(1024)]).numpy()
            accuracy = evaluate_episodes(z, labels, episodes, metric=head.metric, progress=False).accuracy
        else:
            accuracies = []
            for episode in episodes:
                s, sl, q, ql = _episode_tensors(episode)
                logits = head.episode_logits(x[s], sl, x[q], len(episode.classes))
                accuracies.append((logits.argmax(1) == ql).float().mean().item())
            accuracy = float(np.mean(accuracies))
    head.train()
    return accuracy


def train_head(head: HeadBase, features, labels, *, groups=None, ways: int = 20, shots: int = 1, queries: int = 5,
               episodes: int = 2000, within_group: bool = False, lr: float = 1e-3, weight_decay: float = 1e-4,
               seed: int = 0, val_features=None, val_labels=None, val_groups=None, val_episodes: int = 200,
               val_every: int = 200, patience: int | None = 5, progress: bool | None = None,
               threads: int | None = 1) -> TrainResult:
    """Train ``head`` episodically on ``features`` (N, in_dim) with class ``labels`` (N,) (any values).

    ``groups`` (N,) with ``within_group=True`` draws each episode's classes from one group (e.g. one
    Omniglot alphabet); validation episodes do likewise from ``val_groups``. Without validation data
    there is no early stopping and the last weights are kept. ``patience=None`` never stops early.
    With validation data the untrained head is validated first and kept if no trained state beats it
    (``best_episode`` 0), and raw features are scored on the same episodes (``raw_val_accuracy``).
    ``progress``: None = a tqdm bar when on a terminal, True/False = always/never. The head is left
    in eval mode with the kept weights. ``threads``: torch intra-op threads while training (restored
    afterwards); episodes are small batches, where extra threads mostly add synchronisation (measured
    4-25x slower with 2 threads on 2 busy cores); None keeps torch's setting.
    """
    if not isinstance(head, HeadBase):
        raise TypeError(f"train_head expects a fewshot Head, got {type(head).__name__}")
    if not head.episodic:  # e.g. the identity head: statistics only, no episodes
        return head.fit(features, labels, groups=groups)
    x = _features(features, head.in_dim, "features")
    codes = _codes(labels, len(x), "labels")
    ways, shots, queries = (_check_positive(n, v) for n, v in (("ways", ways), ("shots", shots),
                                                               ("queries", queries)))
    episodes, val_episodes, val_every = (_check_positive(n, v) for n, v in (
        ("episodes", episodes), ("val_episodes", val_episodes), ("val_every", val_every)))
    if patience is not None:
        patience = _check_positive("patience", patience)
    if threads is not None:
        threads = _check_positive("threads", threads)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if (val_features is None) != (val_labels is None):
        raise ValueError("pass both val_features and val_labels (held-out classes), or neither")
    if within_group and val_features is not None and val_groups is None:
        raise ValueError("within_group=True validates within groups too: pass val_groups (one per val item)")

    head.prepare_training(int(codes.max()) + 1)
    custom_loss = type(head).loss is not HeadBase.loss and type(head).training_step is HeadBase.training_step
    sampler = EpisodeSampler(codes, ways=ways, shots=shots, queries=queries, groups=groups,
                             within_group=within_group, seed=seed)
    val_x, val_set = None, []
    if val_features is not None:
        val_x = _features(val_features, head.in_dim, "val_features")
        val_codes = _codes(val_labels, len(val_x), "val_labels")
        val_set = EpisodeSampler(val_codes, ways=ways, shots=shots, queries=queries, groups=val_groups,
                                 within_group=within_group,
                                 seed=seed).sample_many(val_episodes)

    history: list[dict] = []
    best_acc, best_episode, best_state, stale, stopped = None, 0, None, 0, False
    raw_acc = initial_acc = None
    if val_set:  # the untrained head is a candidate too: a head initialised at identity never ends below it
        raw_acc = _validate_raw(val_x, val_codes, val_set)
        initial_acc = _validate(head, val_x, val_codes, val_set)
        best_acc, best_state = initial_acc, copy.deepcopy(head.state_dict())
    run = 0
    previous_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if threads is not None:
            torch.set_num_threads(threads)
        params = [p for p in head.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=episodes)
        head.train()
        loss_sum, correct, seen, steps = 0.0, 0, 0, 0
        bar = tqdm(total=episodes, desc="training", unit="episode", disable=None if progress is None else not progress)
        try:
            for run, episode in enumerate(sampler, start=1):
                s, sl, q, ql = _episode_tensors(episode)
                classes = torch.from_numpy(np.asarray(episode.classes, dtype=np.int64))
                if custom_loss:  # a head that only overrides the documented loss()
                    loss, logits = head.loss(x[s], sl, x[q], ql, len(episode.classes)), None
                else:
                    loss, logits = head.training_step(x[s], sl, x[q], ql, len(episode.classes), classes=classes)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training diverged at episode {run} (loss {loss.item()}); "
                                             "lower lr (or the head's inner_lr)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum, steps = loss_sum + loss.item(), steps + 1
                if logits is not None:
                    correct += int((logits.detach().argmax(1) == ql).sum())
                    seen += len(ql)
                bar.update(1)
                if run % 25 == 0:
                    bar.set_postfix(loss=f"{loss_sum / steps:.3f}", refresh=False)
                last = run == episodes
                if run % val_every == 0 or last:
                    point = {"episode": run, "train_loss": loss_sum / steps,
                             "train_accuracy": correct / seen if seen else None, "val_accuracy": None}
                    loss_sum, correct, seen, steps = 0.0, 0, 0, 0
                    if val_set:
                        acc = _validate(head, val_x, val_codes, val_set)
                        point["val_accuracy"] = acc
                        if best_acc is None or acc > best_acc:
                            best_acc, best_episode, stale = acc, run, 0
                            best_state = copy.deepcopy(head.state_dict())
                        else:
                            stale += 1
                    history.append(point)
                    bar.set_postfix(loss=f"{point['train_loss']:.3f}",
                                    **({"val_acc": f"{point['val_accuracy']:.3f}",
                                        "raw": f"{raw_acc:.3f}"} if val_set else {}))
                    if val_set and patience is not None and stale >= patience and not last:
                        stopped = True
                        break
                if last:
                    break
        finally:
            bar.close()
            torch.set_num_threads(previous_threads)
    if best_state is not None:
        head.load_state_dict(best_state)
    else:
        best_episode = run
    head.eval()
    return TrainResult(best_val_accuracy=best_acc, best_episode=best_episode, episodes_run=run,
                       stopped_early=stopped, history=history, raw_val_accuracy=raw_acc,
                       initial_val_accuracy=initial_acc)
