"""Fine-tuning: train the last stages of the encoder together with a head, on one or several datasets,
optionally adapting to an unlabeled target domain.

``finetune([dataset], recipe)`` returns a ``FineTunedHead`` (``fewshot.learning.heads.finetuned``): save it with
``save_head`` and use it as ``--head MODEL`` anywhere a head works. Training, in order:

1. **Split**: each dataset holds out classes (or whole groups, e.g. Omniglot alphabets) for validation.
2. **Frozen prefix, computed once**: the network's stem and the stages before the trainable ones never
   change, so each image (and each augmented view: ``augment = ["flip"]`` adds the mirror image) runs
   through them once; their output maps are kept in memory (float16) and training runs only the last
   ``trainable_stages`` stages. This is what makes fine-tuning fit a 2-core machine. ``precision = "auto"``
   trains them in bfloat16 where the CPU has it (depthwise convolutions stay float32: faster so).
3. **Supervised phase** (``pretrain_steps`` > 0, as in Baseline++ / RFS): a cosine classifier over all
   training classes, mini-batches of ``batch_size``.
4. **Episodic phase** (``episodes``): ProtoNet loss (the head's own episodic loss; for the ``identity``
   head, scaled cosine to the prototypes with a learned temperature). Several datasets: each episode comes
   from one dataset, drawn with ``weights``. ``adapt_to``: unlabeled target images add, weighted by
   ``adapt_weight``, the recipe's ``unlabeled`` objective: ``"dann"``, a domain discriminator behind a
   gradient-reversal layer (Ganin et al. 2016), or ``"distill"``, self-distillation: the features of an
   augmented view (mirror, random crop; cached like the training views) of a target image should point where
   the frozen network's features of the clean image point (cosine loss).
5. **Validation and guard**: every ``val_every`` steps, accuracy on fixed validation episodes; early
   stopping with ``patience``; the best weights are kept. Finally the guard compares them with the
   *frozen* encoder and its identity head (centred, normalised raw features) on the same episodes and
   keeps whichever is better (``guard = false``: always the fine-tuned one). Both figures go into the
   model's metadata. ``deadline``: training stops at that ``time.monotonic()`` time and keeps the best
   validated weights so far (``stopped_for_time``).

Batch-norm layers keep their ImageNet statistics (eval mode): episodes are too small to re-estimate them.
Randomness (splits, views, episodes, dropout) comes from ``seed``; the same call replays exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import math
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.datasets import ImageDataset, cap_per_class, split_validation, with_rotations
from ..embedding.encoders import DEFAULT_ENCODER, Encoder, create_encoder
from ..data.episodes import EpisodeSampler
from ..errors import ImageError
from ..evaluation.evaluate import evaluate_episodes
from .heads import Head, create_head
from .augment import training_views, view_count
from .base import prototype_logits, seeded
from .recipe import AUGMENTATIONS as AUGMENTATIONS
from .recipe import FineTuneResult as FineTuneResult
from .recipe import Recipe as Recipe
from .heads.finetuned import FineTunedHead
from ..embedding.images import content_digest, load_image

# ---------------------------------------------------------------- the network split at the trainable stages

class SplitNetwork(nn.Module):
    """An EfficientNet-family timm network (``conv_stem``, ``blocks``, ``stage_ends``) as a frozen prefix
    and a trainable suffix that together compute exactly the ``Encoder``'s features."""

    def __init__(self, model: nn.Module, stages: tuple[int, ...] | None, pool, trainable: int):
        super().__init__()
        if not all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "stage_ends", "conv_head")):
            raise ValueError(f"fine-tuning supports EfficientNet-family encoders (e.g. {DEFAULT_ENCODER}); "
                             f"{type(model).__name__} has no conv_stem/blocks/stage_ends")
        self.model, self.pool = model, pool
        self.final = stages is None
        self.taps = None if self.final else sorted({int(model.stage_ends[s]) for s in stages})
        self.end = len(model.blocks) if self.final else max(self.taps)
        if not 0 <= trainable <= self.end:
            raise ValueError(f"trainable_stages must be in 0..{self.end} for these features, got {trainable}")
        self.boundary = self.end - trainable  # blocks before it are frozen
        self.trainable = trainable

    def trainable_modules(self) -> list[nn.Module]:
        modules = list(self.model.blocks[self.boundary:self.end])
        if self.final and self.trainable:
            modules += [self.model.conv_head, self.model.bn2]
        return modules

    def prefix(self, batch: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(hidden map entering the first trainable block, pooled features of the frozen taps)."""
        x = self.model.bn1(self.model.conv_stem(batch))
        taken = [x] if self.taps and 0 in self.taps else []
        for index in range(1, self.boundary + 1):
            x = self.model.blocks[index - 1](x)
            if self.taps and index in self.taps:
                taken.append(x)
        if self.final and not self.trainable:
            taken = [self.model.bn2(self.model.conv_head(x))]
        pooled = _pool(taken, self.pool) if taken else batch.new_zeros((len(batch), 0))
        return (x if self.trainable else None), pooled

    def suffix(self, hidden: torch.Tensor | None, frozen: torch.Tensor) -> torch.Tensor:
        """Features from the prefix's outputs, through the trainable blocks."""
        if not self.trainable:
            return frozen
        x, taken = hidden, []
        for index in range(self.boundary + 1, self.end + 1):
            x = self.model.blocks[index - 1](x)
            if self.taps and index in self.taps:
                taken.append(x)
        if self.final:
            taken = [self.model.bn2(self.model.conv_head(x))]
        return torch.cat([frozen, _pool(taken, self.pool)], dim=1)


def _pool(maps: list[torch.Tensor], pool) -> torch.Tensor:
    """Pool each map as ``Encoder`` does (global mean, or a g x g grid flattened channel-major)."""
    if pool == "avg":
        return torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)
    return torch.cat([F.adaptive_avg_pool2d(m, pool).flatten(1) for m in maps], dim=1)


# ---------------------------------------------------------------- data: prefix outputs of every image and view

@dataclass
class _Cached:
    """The frozen prefix's outputs for every (image, view) of a split: what training reads."""

    hidden: torch.Tensor | None  # (N, V, C, H, W) float16
    frozen: torch.Tensor  # (N, V, D0) float16 (pooled frozen taps; all features when nothing trains)
    labels: np.ndarray
    groups: np.ndarray | None
    teacher: torch.Tensor | None = None  # (N, D) the frozen network's features of view 0 (distillation)

    def __len__(self) -> int:
        return len(self.frozen)


def _cache_split(net: SplitNetwork, encoder: Encoder, dataset: ImageDataset, augment, what: str,
                 progress: bool | None, batch_size: int = 16, seed: int = 0, teacher: bool = False) -> _Cached:
    """Run every image of ``dataset`` (all views) through the frozen prefix once; bad images are left out.
    ``teacher``: also keep the (still untrained) network's features of each image's view 0."""
    hidden, frozen, ok, teachers = [], [], [], []
    n_views = view_count(augment)
    batch, rows = [], []

    def flush():
        if not batch:
            return
        x = torch.cat(batch).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            h, f = net.prefix(x)
            if teacher:
                teachers.append(net.suffix(h[::n_views] if h is not None else None, f[::n_views]).float())
        frozen.append(f.reshape(len(rows), n_views, -1).half())
        if h is not None:
            hidden.append(h.reshape(len(rows), n_views, *h.shape[1:]).half().contiguous())
        ok.extend(rows)
        batch.clear()
        rows.clear()

    failed = []
    hide = None if progress is None else not progress
    for i, item in enumerate(tqdm(dataset.items, desc=f"prefix {what}", unit="img", disable=hide, leave=False)):
        try:
            image = encoder.transform(load_image(item))
        except ImageError as exc:
            failed.append(str(exc))
            continue
        batch.append(torch.stack(training_views(image, augment, np.random.default_rng([seed, i]))))
        rows.append(i)
        if len(rows) == batch_size:
            flush()
    flush()
    if failed:
        warnings.warn(f"{len(failed)} of {len(dataset)} images could not be read and are left out "
                      f"(first: {failed[0]})", RuntimeWarning, stacklevel=3)
    if not ok:
        raise ImageError(f"none of the {len(dataset)} images of {dataset.source} ({what}) could be read")
    ok = np.asarray(ok)
    return _Cached(hidden=torch.cat(hidden) if hidden else None, frozen=torch.cat(frozen),
                   labels=np.unique(dataset.labels[ok], return_inverse=True)[1].reshape(-1),
                   groups=dataset.groups[ok] if dataset.groups is not None else None,
                   teacher=torch.cat(teachers) if teachers else None)


def data_digest(datasets: list[ImageDataset]) -> str:
    """sha256 over every image's content digest and class name: which data a model was trained on."""
    digest = hashlib.sha256()
    for dataset in datasets:
        for item, label in zip(dataset.items, dataset.labels):
            try:
                digest.update(content_digest(item).encode())
            except ImageError:
                digest.update(b"unreadable")
            digest.update(dataset.classes[label].encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- domain adaptation (DANN)

class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, strength):
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.strength * grad, None


class DomainDiscriminator(nn.Module):
    """Tells source from target features through a gradient-reversal layer (Ganin et al., JMLR 2016):
    minimising its loss trains it, and pushes the features to make the domains indistinguishable."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def loss(self, source: torch.Tensor, target: torch.Tensor, strength: float) -> torch.Tensor:
        z = _ReverseGradient.apply(torch.cat([source, target]), strength)
        truth = torch.cat([torch.ones(len(source)), torch.zeros(len(target))])
        return F.binary_cross_entropy_with_logits(self.net(z).squeeze(1), truth)


# ---------------------------------------------------------------- training

@dataclass
class _Task:
    """One dataset's cached training and validation data, its episode sampler and validation episodes."""

    name: str
    weight: float
    train: _Cached
    val: _Cached
    sampler: EpisodeSampler
    val_episodes: list


class _Model(nn.Module):
    """Split network + head (+ cosine temperature for the identity head) during training."""

    def __init__(self, net: SplitNetwork, head: Head, bfloat16: bool = False):
        super().__init__()
        self.net, self.head = net, head
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bfloat16 = bfloat16
        if bfloat16:
            for module in net.trainable_modules():
                _depthwise_in_float32(module)

    def features(self, cached: _Cached, rows, views=None) -> torch.Tensor:
        """Features of cached rows (views); while gradients are on, in bfloat16 if asked (validation, the
        guard and the saved model always compute in float32)."""
        rows = torch.as_tensor(rows)
        views = torch.zeros_like(rows) if views is None else torch.as_tensor(views)
        hidden = cached.hidden[rows, views].float().contiguous(memory_format=torch.channels_last) \
            if cached.hidden is not None else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bfloat16 and torch.is_grad_enabled()):
            return self.net.suffix(hidden, cached.frozen[rows, views].float()).float()

    def episode_loss(self, z: torch.Tensor, n_support: int, support_labels, query_labels, ways: int):
        if self.head.episodic:
            return self.head.training_step(z[:n_support], support_labels, z[n_support:], query_labels, ways)[0]
        logits = prototype_logits(z[:n_support], support_labels, z[n_support:], ways, "cosine", self.log_scale.exp())
        return F.cross_entropy(logits, query_labels)

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """Head-space vectors (differentiable) for the classifier phase and the discriminator."""
        return self.head(z) if self.head.episodic else F.normalize(z, dim=1)

    def train(self, mode: bool = True):  # batch norm keeps its ImageNet statistics throughout
        super().train(mode)
        for module in self.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


def _depthwise_in_float32(module: nn.Module) -> None:
    """Under bfloat16 autocast, keep depthwise convolutions in float32: on a 2-core AVX-512 CPU their bfloat16
    kernels were slower than float32 (forward and backward), while the 1x1 convolutions ran ~2x faster."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.groups == conv.in_channels:
            conv.forward = functools.partial(_float32_forward, conv, type(conv).forward)


def _float32_forward(conv: nn.Conv2d, forward, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", enabled=False):
        return forward(conv, x.float())


def _all_features(model: _Model, cached: _Cached, rows=None, chunk: int = 64) -> np.ndarray:
    rows = np.arange(len(cached)) if rows is None else rows
    with torch.no_grad():
        return torch.cat([model.features(cached, rows[s:s + chunk]) for s in range(0, len(rows), chunk)]).numpy()


def _centring_features(model: _Model, cached: _Cached, seed: int, limit: int = 512) -> np.ndarray:
    """Features of at most ``limit`` seeded training rows: enough for the identity head's centring mean."""
    rows = np.random.default_rng(seed).permutation(len(cached))[:limit]
    return _all_features(model, cached, np.sort(rows))


def _identity_head(features: np.ndarray, seed: int) -> Head:
    head = create_head("identity", features.shape[1], seed=seed)
    head.fit(features)
    return head


def _validate(model: _Model, tasks: list[_Task], seed: int, identity: bool = False) -> dict[str, float]:
    """Validation accuracy per task with the model's head, or with ``identity`` (or an identity head recipe)
    the identity head: centred on the training features, normalised, cosine."""
    model.eval()
    accuracies = {}
    for task in tasks:
        val = _all_features(model, task.val)
        head = model.head if model.head.episodic and not identity else \
            _identity_head(_centring_features(model, task.train, seed), seed)
        accuracies[task.name] = evaluate_episodes(val, task.val.labels, task.val_episodes, head=head,
                                                  progress=False).accuracy
    model.train()
    return accuracies


def _mean(accuracies: dict[str, float], tasks: list[_Task]) -> float:
    total = sum(t.weight for t in tasks)
    return float(sum(accuracies[t.name] * t.weight for t in tasks) / total)


def finetune(datasets: list[ImageDataset] | ImageDataset, recipe: Recipe | None = None, *,
             weights: list[float] | None = None, adapt_to: ImageDataset | None = None,
             progress: bool | None = None, threads: int | None = 1,
             deadline: float | None = None) -> tuple[FineTunedHead, FineTuneResult]:
    """Fine-tune on ``datasets`` (one or more, sampled by ``weights``); see the module docstring.

    ``adapt_to``: unlabeled images of the target domain (their labels are ignored), used as the recipe's
    ``unlabeled`` objective says (DANN or distillation).
    ``deadline``: a ``time.monotonic()`` time; training stops once it is reached and keeps the best validated
    weights (``result.stopped_for_time``). It may be overrun by one step, a validation and packaging; the frozen
    prefix's pass over the images always completes (``result.seconds_caching``).
    KeyboardInterrupt propagates (nothing is returned).
    ``progress``: None = a bar on a terminal, else one line per validation on stderr; True/False = always a
    bar / nothing.
    ``threads``: torch threads while training (restored afterwards; None keeps torch's setting). One thread is
    the default: on 2 busy cores, two OpenMP threads made the frozen prefix and small episodes ~10x slower.
    """
    start = time.perf_counter()
    recipe = recipe or Recipe()
    datasets = [datasets] if isinstance(datasets, ImageDataset) else list(datasets)
    if not datasets:
        raise ValueError("pass at least one dataset to fine-tune on")
    weights = [1.0] * len(datasets) if weights is None else [float(w) for w in weights]
    if len(weights) != len(datasets) or not all(w > 0 for w in weights):
        raise ValueError(f"weights must be one positive number per dataset ({len(datasets)}), got {weights}")
    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            return _finetune(datasets, recipe, weights, adapt_to, progress, start, deadline)
    finally:
        torch.set_num_threads(previous_threads)


def _use_bfloat16(precision: str) -> bool:
    """bfloat16 training arithmetic: ~1.7x faster for the 1x1 convolutions where the CPU has native bfloat16."""
    return precision == "bfloat16" or (precision == "auto" and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _finetune(datasets, recipe: Recipe, weights, adapt_to, progress, start,
              deadline) -> tuple[FineTunedHead, FineTuneResult]:
    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    encoder = create_encoder(recipe.encoder, stages=recipe.stages, pool=recipe.pool, input_size=recipe.input_size,
                             compile="none")
    base_fingerprint = encoder.fingerprint
    network = copy.deepcopy(encoder.model).to(memory_format=torch.contiguous_format).requires_grad_(False)
    net = SplitNetwork(network, recipe.stages, recipe.pool, recipe.trainable_stages)
    tasks = [_make_task(net, encoder, d, w, recipe, i, len(datasets), progress)
             for i, (d, w) in enumerate(zip(datasets, weights))]
    target = None
    if adapt_to is not None:
        distill = recipe.unlabeled == "distill"
        views = ("flip", "crop") if distill else recipe.augment
        target = _cache_split(net, encoder, cap_per_class(adapt_to, recipe.max_images_per_class, recipe.seed),
                              views, "target", progress, seed=recipe.seed, teacher=distill)
    seconds_caching = time.perf_counter() - start

    with seeded(recipe.seed):
        head = create_head(recipe.head, encoder.dim, in_shape=encoder.feature_shape, seed=recipe.seed,
                           **recipe.head_params)
    model = _Model(net, head, _use_bfloat16(recipe.precision))
    frozen_accuracy = _validate(model, tasks, recipe.seed, identity=True)  # the frozen encoder, raw features
    frozen_state = copy.deepcopy(net.state_dict())
    for module in net.trainable_modules():
        module.requires_grad_(True)

    history, stopped, step = [], False, 0
    if recipe.pretrain_steps:
        _classifier_phase(model, tasks, recipe, progress, out_of_time)
    best = (_validate(model, tasks, recipe.seed), copy.deepcopy(model.state_dict()))
    dann = target is not None and recipe.unlabeled == "dann"
    discriminator = DomainDiscriminator(head.out_dim if head.episodic else encoder.dim) if dann else None
    optimizer = _optimizer(model, discriminator, recipe)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.episodes)
    rng = np.random.default_rng(recipe.seed)
    p = np.asarray([t.weight for t in tasks]) / sum(t.weight for t in tasks)
    stale, loss_sum, since_validation, timed_out = 0, 0.0, 0, False
    model.train()
    with tqdm(total=recipe.episodes, desc="fine-tuning", unit="episode",
              disable=None if progress is None else not progress) as bar:
        for step in range(1, recipe.episodes + 1):
            if out_of_time():
                step, timed_out = step - 1, True
                break
            task = tasks[int(rng.choice(len(tasks), p=p))]
            loss = _episode_step(model, task, rng, recipe)
            if discriminator is not None:
                loss = loss + recipe.adapt_weight * _domain_loss(model, discriminator, task, target, rng,
                                                                 step / recipe.episodes)
            elif target is not None:
                loss = loss + recipe.adapt_weight * _distill_loss(model, target, rng)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning diverged at episode {step}; lower lr and encoder_lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum, since_validation = loss_sum + loss.item(), since_validation + 1
            bar.update(1)
            if step % recipe.val_every == 0 or step == recipe.episodes or out_of_time():
                accuracies = _validate(model, tasks, recipe.seed)
                score = _mean(accuracies, tasks)
                history.append({"episode": step, "train_loss": loss_sum / since_validation, "val_accuracy": score})
                loss_sum, since_validation = 0.0, 0
                bar.set_postfix(val_acc=f"{score:.3f}")
                if progress is None and bar.disable:  # no bar (stderr is not a terminal): a line per validation
                    print(f"fine-tuning: episode {step}/{recipe.episodes}, validation accuracy {score:.3f} "
                          f"(best {max(score, _mean(best[0], tasks)):.3f})", file=sys.stderr, flush=True)
                if score > _mean(best[0], tasks):
                    best, stale = (accuracies, copy.deepcopy(model.state_dict())), 0
                else:
                    stale += 1
                    if stale >= recipe.patience and step < recipe.episodes:
                        stopped = True
                        break
    model.load_state_dict(best[1])
    model.eval()
    finetuned_accuracy = best[0]
    wins = _mean(finetuned_accuracy, tasks) > _mean(frozen_accuracy, tasks)
    kept = "finetuned" if wins or not recipe.guard else "frozen"
    if kept == "frozen":
        net.load_state_dict(frozen_state)
    result = FineTuneResult(
        kept=kept, val_accuracy_finetuned=_mean(finetuned_accuracy, tasks),
        val_accuracy_frozen=_mean(frozen_accuracy, tasks),
        val_accuracy_per_dataset={t.name: {"finetuned": finetuned_accuracy[t.name], "frozen": frozen_accuracy[t.name]}
                                  for t in tasks},
        steps_run=step, stopped_early=stopped, seconds=time.perf_counter() - start, history=history,
        stopped_for_time=timed_out, seconds_caching=seconds_caching)
    model_head = _package(model, encoder, tasks, kept, recipe)
    model_head.metadata["lineage"] = {"base_encoder": base_fingerprint, "data_digest": data_digest(datasets),
                                      "datasets": [d.source for d in datasets], "weights": weights,
                                      "adapt_to": adapt_to.source if adapt_to is not None else None,
                                      "recipe": recipe.to_dict(), "seed": recipe.seed}
    model_head.metadata["training"] = {k: v for k, v in dataclasses.asdict(result).items() if k != "history"}
    model_head.metadata["training"]["history"] = history
    return model_head, result


def _make_task(net, encoder, dataset, weight, recipe: Recipe, index: int, n: int, progress) -> _Task:
    dataset = cap_per_class(dataset, recipe.max_images_per_class, recipe.seed)
    train, val = split_validation(dataset, recipe.val_fraction, recipe.seed)
    if "rotations" in recipe.augment:
        train = with_rotations(train)
    name = dataset.source if n == 1 else f"{index}:{dataset.source}"
    cached_train = _cache_split(net, encoder, train, recipe.augment, "train", progress, seed=recipe.seed)
    cached_val = _cache_split(net, encoder, val, (), "validation", progress)
    ways = min(recipe.ways, _max_ways(cached_train, recipe.within_group), _max_ways(cached_val, recipe.within_group))
    sampler = EpisodeSampler(cached_train.labels, ways=ways, shots=recipe.shots, queries=recipe.queries,
                             groups=cached_train.groups, within_group=recipe.within_group, seed=recipe.seed)
    val_episodes = EpisodeSampler(cached_val.labels, ways=ways, shots=recipe.shots, queries=recipe.queries,
                                  groups=cached_val.groups, within_group=recipe.within_group,
                                  seed=recipe.seed).sample_many(recipe.val_episodes)
    return _Task(name=name, weight=weight, train=cached_train, val=cached_val, sampler=sampler,
                 val_episodes=val_episodes)


def _max_ways(cached: _Cached, within_group: bool) -> int:
    if within_group and cached.groups is not None:
        classes_per_group = [len(np.unique(cached.labels[cached.groups == g])) for g in np.unique(cached.groups)]
        return int(max(classes_per_group))
    return int(cached.labels.max()) + 1


def _optimizer(model: _Model, extra: nn.Module | None, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW: the trainable stages at ``encoder_lr``; the head and ``extra`` (discriminator, classifier) at ``lr``."""
    encoder_params = [p for m in model.net.trainable_modules() for p in m.parameters()]
    head_params = [p for p in model.head.parameters() if p.requires_grad] + [model.log_scale]
    if extra is not None:
        head_params += list(extra.parameters())
    groups = [{"params": head_params, "lr": recipe.lr}]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": recipe.encoder_lr})
    return torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)


def _random_views(rng, cached: _Cached, n: int) -> np.ndarray:
    return rng.integers(0, cached.frozen.shape[1], size=n)


def _episode_step(model: _Model, task: _Task, rng, recipe: Recipe) -> torch.Tensor:
    episode = task.sampler.sample()
    rows = np.concatenate([episode.support, episode.query])
    z = model.features(task.train, rows, _random_views(rng, task.train, len(rows)))
    return model.episode_loss(z, len(episode.support), torch.as_tensor(episode.support_labels).long(),
                              torch.as_tensor(episode.query_labels).long(), len(episode.classes))


def _distill_loss(model: _Model, target: _Cached, rng, n: int = 32) -> torch.Tensor:
    """Self-distillation on unlabeled target images: features of an augmented view (never view 0) should
    point where the frozen network's features of the clean image point (cosine loss)."""
    rows = rng.choice(len(target), min(n, len(target)), replace=False)
    views = rng.integers(1, target.frozen.shape[1], size=len(rows))
    student = model.features(target, rows, views)
    return (1 - F.cosine_similarity(student, target.teacher[torch.as_tensor(rows)], dim=1)).mean()


def _domain_loss(model: _Model, discriminator, task: _Task, target: _Cached, rng, progress_fraction: float):
    n = min(32, len(target), len(task.train))
    source = model.embed(model.features(task.train, rng.choice(len(task.train), n, replace=False),
                                        _random_views(rng, task.train, n)))
    target_rows = rng.choice(len(target), n, replace=False)
    other = model.embed(model.features(target, target_rows, _random_views(rng, target, n)))
    strength = 2.0 / (1.0 + math.exp(-10 * progress_fraction)) - 1.0  # Ganin et al.'s ramp from 0 to 1
    return discriminator.loss(source, other, strength)


def _classifier_phase(model: _Model, tasks: list[_Task], recipe: Recipe, progress, out_of_time) -> None:
    """Supervised phase: a cosine classifier over every training class (per dataset), cross-entropy; ends early
    when ``out_of_time()``."""
    rng = np.random.default_rng(recipe.seed + 1)
    with torch.no_grad():
        dim = model.embed(model.features(tasks[0].train, [0])).shape[1]
    classifiers = nn.ModuleList([nn.Linear(dim, int(t.train.labels.max()) + 1, bias=False) for t in tasks])
    optimizer = _optimizer(model, classifiers, recipe)
    p = np.asarray([t.weight for t in tasks]) / sum(t.weight for t in tasks)
    model.train()
    for _ in tqdm(range(recipe.pretrain_steps), desc="classifier phase", unit="step",
                  disable=None if progress is None else not progress, leave=False):
        if out_of_time():
            break
        k = int(rng.choice(len(tasks), p=p))
        task = tasks[k]
        rows = rng.choice(len(task.train), min(recipe.batch_size, len(task.train)), replace=False)
        z = F.normalize(model.embed(model.features(task.train, rows, _random_views(rng, task.train, len(rows)))), dim=1)
        logits = model.log_scale.exp() * z @ F.normalize(classifiers[k].weight, dim=1).t()
        loss = F.cross_entropy(logits, torch.as_tensor(task.train.labels[rows]).long())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _package(model: _Model, encoder: Encoder, tasks: list[_Task], kept: str, recipe: Recipe) -> FineTunedHead:
    """The saved form: the network's weights and the head (an identity head fit on training features when the
    guard kept the frozen encoder or the recipe trains no head)."""
    head = model.head
    if kept == "frozen" or not head.episodic:
        train_features = np.concatenate([_centring_features(model, t.train, recipe.seed) for t in tasks])
        head = _identity_head(train_features, recipe.seed)
    return FineTunedHead.wrap(encoder, head, network=model.net.model, seed=recipe.seed)
