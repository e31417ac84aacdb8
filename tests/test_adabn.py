"""AdaBN on real Omniglot drawings: new batch-norm statistics, a new fingerprint, the original untouched, and a
model packaged with ``FineTunedHead.wrap`` that saves, loads and embeds exactly as the adapted encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot import create_encoder, load_dataset, load_head
from fewshot.errors import ImageError
from fewshot.learning import create_head, save_head
from fewshot.learning.adabn import adapt_batchnorm
from fewshot.learning.heads.finetuned import FineTunedHead


@pytest.fixture(scope="module")
def drawings(omniglot_small):
    dataset = load_dataset(omniglot_small)
    return dataset.select_items(np.arange(len(dataset)) % 97 == 0)  # ~40 drawings across alphabets


@pytest.fixture(scope="module")
def small_encoder():
    return create_encoder(input_size=64, compile="none")


@pytest.fixture(scope="module")
def adapted(small_encoder, drawings):
    return adapt_batchnorm(small_encoder, drawings, batch_size=16, progress=False)


def _running_means(encoder) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in encoder.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_statistics_and_fingerprint_change_and_the_original_is_untouched(small_encoder, adapted, drawings):
    before = _running_means(create_encoder(input_size=64, compile="none"))
    after = _running_means(adapted)
    assert len(after) == len(before) > 10
    assert all(not torch.allclose(a, b) for a, b in zip(after, before))  # every layer re-measured
    assert [m.momentum for m in adapted.model.modules() if isinstance(m, torch.nn.BatchNorm2d)][0] == 0.1
    assert all(torch.equal(a, b) for a, b in zip(_running_means(small_encoder), before))
    assert adapted.fingerprint["weights_sha256"] != small_encoder.fingerprint["weights_sha256"]
    assert {k: v for k, v in adapted.fingerprint.items() if k != "weights_sha256"} == \
        {k: v for k, v in small_encoder.fingerprint.items() if k != "weights_sha256"}
    # drawings are far from photos: their features now sit closer to the origin of the domain (better centred)
    x = drawings.items[:8]
    assert np.abs(adapted.embed(x).mean(0)).mean() < np.abs(small_encoder.embed(x).mean(0)).mean()


def test_same_images_and_seed_give_the_same_encoder(small_encoder, adapted, drawings):
    again = adapt_batchnorm(small_encoder, drawings, batch_size=16, progress=False)
    assert again.fingerprint == adapted.fingerprint


def test_wrapped_model_round_trips_with_identical_vectors(adapted, drawings, tmp_path):
    head = create_head("identity", adapted.dim)
    head.fit(adapted.embed(drawings.items[:20]))
    model = FineTunedHead.wrap(adapted, head)
    assert model.metadata["encoder"] == adapted.fingerprint
    save_head(model, tmp_path / "adabn")
    loaded = load_head(tmp_path / "adabn")
    carried = loaded.carried_encoder()
    assert carried.fingerprint == adapted.fingerprint
    items = drawings.items[20:26]
    np.testing.assert_array_equal(carried.embed(items), adapted.embed(items))
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(torch.from_numpy(carried.embed(items))).numpy(),
                                      head(torch.from_numpy(adapted.embed(items))).numpy())


def test_unreadable_images_are_left_out_with_a_warning_and_none_readable_fails(small_encoder, drawings,
                                                                                corrupt_jpeg):
    with pytest.warns(RuntimeWarning, match="1 of 5 images could not be read"):
        adapt_batchnorm(small_encoder, [*drawings.items[:4], corrupt_jpeg], progress=False)
    with pytest.raises(ImageError, match="none of the 1 images"):
        adapt_batchnorm(small_encoder, [corrupt_jpeg], progress=False)
    with pytest.raises(ValueError, match="needs images"):
        adapt_batchnorm(small_encoder, [], progress=False)
