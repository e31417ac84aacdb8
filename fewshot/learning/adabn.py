"""AdaBN: re-estimate an encoder's batch-norm statistics on a new domain (Li, Wang, Shi, Liu, Hou, "Revisiting
Batch Normalization For Practical Domain Adaptation", 2016).

A network trained on ImageNet photos normalises every layer with photo statistics; on textures, drawings or
aerial scenes those are off. ``adapt_batchnorm(encoder, images)`` runs the domain's images (labelled or not)
through the network once, with every batch-norm layer averaging its batches' mean and variance (cumulative,
``momentum=None``) and nothing else changing, and returns a new frozen ``Encoder`` with those statistics. Its
fingerprint differs from the original's (the weights digest covers the running statistics), so registries never
mix the two. Save it with a head as one model: ``FineTunedHead.wrap(adapted, head)`` then ``save_head``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.datasets import ImageDataset
from ..embedding.encoders import Encoder
from ..embedding.images import load_image
from ..errors import ImageError


def adapt_batchnorm(encoder: Encoder, images: ImageDataset | Sequence, *, max_images: int = 1000,
                    batch_size: int = 32, seed: int = 0, progress: bool | None = None) -> Encoder:
    """A new frozen ``Encoder`` (same name, stages, pool, input size) whose batch-norm running mean and variance
    are those of ``images`` (a dataset, or image paths / PIL images / bytes), preprocessed as ``encoder`` does.

    At most ``max_images`` images are used (a seeded sample), in batches of ``batch_size``. Unreadable images
    are left out with a warning; none readable is an ImageError. ``encoder`` itself is not changed.
    """
    if type(encoder) is not Encoder:
        raise ValueError(f"AdaBN adapts one network; got a {type(encoder).__name__} (adapt each member instead)")
    items = list(images.items) if isinstance(images, ImageDataset) else list(images)
    if max_images < 1 or batch_size < 2:
        raise ValueError(f"max_images must be >= 1 and batch_size >= 2, got {max_images} and {batch_size}")
    if not items:
        raise ValueError("adapt_batchnorm needs images of the domain; got none")
    model = copy.deepcopy(encoder.model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError(f"{encoder.name} has no batch-norm layers: AdaBN does not apply")
    order = np.random.default_rng(seed).permutation(len(items))[:max_images]
    model.eval()
    for norm in norms:  # only the batch-norm layers measure; dropout and drop-path stay off
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over all batches
        norm.train()
    used, failed = _measure(model, encoder, [items[i] for i in np.sort(order)], batch_size, progress)
    if not used:
        raise ImageError(f"none of the {len(order)} images could be read (first: {failed[0]}); give the "
                         "domain's images")
    if failed:
        warnings.warn(f"{len(failed)} of {len(order)} images could not be read and are left out of the "
                      f"batch-norm statistics (first: {failed[0]})", RuntimeWarning, stacklevel=2)
    for norm, original in zip(norms, [m for m in encoder.model.modules()
                                      if isinstance(m, nn.modules.batchnorm._BatchNorm)]):
        norm.momentum = original.momentum
    return Encoder(model.eval(), name=encoder.name, stages=encoder.stages, pool=encoder.pool,
                   input_size=encoder.data_config["input_size"][-1], compile=encoder.compile,
                   runtime=encoder.runtime)


def _measure(model: nn.Module, encoder: Encoder, items: list, batch_size: int,
             progress: bool | None) -> tuple[int, list[str]]:
    """Run ``items`` through ``model`` in batches of nearly equal size (each batch weighs the same in the
    cumulative average); returns (images used, errors)."""
    failed = []
    bar = tqdm(total=len(items), desc="AdaBN", unit="img", disable=None if progress is None else not progress,
               leave=False)
    for batch in np.array_split(np.arange(len(items)), math.ceil(len(items) / batch_size)):
        tensors = []
        for i in batch:
            try:
                tensors.append(encoder.transform(load_image(items[i])))
            except ImageError as exc:
                failed.append(str(exc))
        if tensors:
            with torch.no_grad():
                model(torch.stack(tensors).contiguous(memory_format=torch.channels_last))
        bar.update(len(batch))
    bar.close()
    return len(items) - len(failed), failed
