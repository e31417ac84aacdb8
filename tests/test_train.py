"""Episodic training on cached embeddings: trained heads must beat raw nearest-prototype on held-out
classes; runs are reproducible; validation keeps and restores the best weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot.data.episodes import EpisodeSampler
from fewshot.learning.heads import create_head
from fewshot.learning.train import TrainResult, train_head


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def low_variance_signal(seed, n_classes, per_class=10, dim=32, signal_dims=4, noise=3.0, spread=0.3,
                        signal_at=0):
    """Classes differ only in ``signal_dims`` low-variance dimensions (class means ~ N(0, 1), spread 0.3);
    every other dimension is N(0, noise^2) noise, so raw nearest-prototype is poor."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    x = noise * rng.normal(size=(len(y), dim))
    dims = slice(signal_at, signal_at + signal_dims)
    x[:, dims] = rng.normal(size=(n_classes, signal_dims))[y] + spread * rng.normal(size=(len(y), signal_dims))
    return x.astype(np.float32), y


def shifted_patterns(seed, n_classes, per_class=10, channels=4, size=8, k=3, noise=0.3):
    """Flattened (C, H, W) maps: each class is a random k x k x C template at a random position."""
    rng = np.random.default_rng(seed)
    templates = rng.normal(size=(n_classes, channels, k, k))
    y = np.repeat(np.arange(n_classes), per_class)
    x = noise * rng.normal(size=(len(y), channels, size, size))
    for i, label in enumerate(y):
        r, c = rng.integers(0, size - k + 1, size=2)
        x[i, :, r:r + k, c:c + k] += templates[label]
    return x.reshape(len(y), -1).astype(np.float32), y


def accuracy(head, x, y, episodes, ways=None):
    """Nearest-prototype query accuracy in head space, computed independently in numpy."""
    z = head.transform(x).astype(np.float64)
    if head.metric == "cosine":
        z /= np.linalg.norm(z, axis=1, keepdims=True)
    accs = []
    for e in episodes:
        w = len(e.classes)
        p = np.stack([z[e.support][e.support_labels == c].mean(0) for c in range(w)])
        if head.metric == "cosine":
            score = z[e.query] @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T
        else:
            score = -((z[e.query][:, None] - p[None]) ** 2).sum(-1)
        accs.append(np.mean(score.argmax(1) == e.query_labels))
    return float(np.mean(accs))


def held_out_episodes(y, n=100, ways=5):
    return EpisodeSampler(y, ways=ways, shots=1, queries=5, seed=99).sample_many(n)


@pytest.fixture(scope="module")
def signal_task():
    (x, y), (x_test, y_test) = low_variance_signal(0, 40), low_variance_signal(1, 20)
    identity = create_head("identity", x.shape[1])
    identity.fit(x, y)
    episodes = held_out_episodes(y_test)
    return x, y, x_test, y_test, episodes, accuracy(identity, x_test, y_test, episodes)


# ---------------------------------------------------------------- trained heads beat raw features

@pytest.mark.parametrize("name,params,episodes", [
    ("protonet", {}, 400),  # MLP projection, squared Euclidean
    ("protonet", {"distance": "cosine"}, 300),  # learned temperature
    ("metric", {}, 300),  # SupConLoss from pytorch-metric-learning
    ("metric", {"loss": "triplet"}, 300),
])
def test_trained_head_beats_identity_on_held_out_classes(signal_task, name, params, episodes):
    x, y, x_test, y_test, test_episodes, identity_acc = signal_task
    assert identity_acc < 0.3  # 5-way: chance is 0.2; the noise drowns the class signal
    head = create_head(name, x.shape[1], **params)
    result = head.fit(x, y, ways=10, queries=5, episodes=episodes, progress=False)
    assert result.episodes_run == episodes and result.best_val_accuracy is None
    trained_acc = accuracy(head, x_test, y_test, test_episodes)
    assert trained_acc > identity_acc + 0.3, (trained_acc, identity_acc)


def test_conv_head_learns_spatial_patterns_that_identity_and_mlp_miss():
    (x, y), (x_test, y_test) = shifted_patterns(0, 40), shifted_patterns(1, 20)
    episodes = held_out_episodes(y_test)
    identity = create_head("identity", x.shape[1])
    identity.fit(x, y)
    conv = create_head("protonet", x.shape[1], arch="conv", in_shape=(4, 8, 8), channels=32, pool_size=1)
    untrained_conv = accuracy(conv, x_test, y_test, episodes)
    conv.fit(x, y, ways=10, episodes=150, progress=False)
    mlp = create_head("protonet", x.shape[1])
    mlp.fit(x, y, ways=10, episodes=150, progress=False)
    identity_acc, conv_acc = accuracy(identity, x_test, y_test, episodes), accuracy(conv, x_test, y_test, episodes)
    mlp_acc = accuracy(mlp, x_test, y_test, episodes)
    assert conv_acc > identity_acc + 0.3, (conv_acc, identity_acc)
    assert conv_acc > mlp_acc + 0.2, (conv_acc, mlp_acc)  # translation needs the convolutions
    assert conv_acc > untrained_conv + 0.1, (conv_acc, untrained_conv)  # and training


def test_arcface_uses_dataset_wide_labels_and_needs_num_classes(signal_task):
    x, y, x_test, y_test, test_episodes, identity_acc = signal_task
    with pytest.raises(ValueError, match="num_classes"):
        create_head("metric", x.shape[1], loss="arcface")
    with pytest.raises(ValueError, match="num_classes=40"):  # refused before any training
        create_head("metric", x.shape[1], loss="arcface", num_classes=10).fit(x, y, ways=10, progress=False)
    head = create_head("metric", x.shape[1], loss="arcface", num_classes=40)
    head.fit(x, y, ways=10, episodes=300, lr=3e-3, progress=False)  # its class weights learn slowly at 1e-3
    assert accuracy(head, x_test, y_test, test_episodes) > identity_acc + 0.25


# ---------------------------------------------------------------- ANIL / MAML

@pytest.mark.parametrize("name", ["anil", "maml"])
def test_adapting_on_the_support_set_beats_no_adaptation(name):
    (x, y), (x_test, y_test) = low_variance_signal(0, 40, noise=1.5), low_variance_signal(1, 20, noise=1.5)
    test_episodes = held_out_episodes(y_test, n=50)
    identity = create_head("identity", x.shape[1])
    identity.fit(x, y)
    identity_acc = accuracy(identity, x_test, y_test, test_episodes)
    head = create_head(name, x.shape[1], ways=5)
    head.fit(x, y, ways=5, queries=5, episodes=250, progress=False)
    xt = torch.from_numpy(x_test)

    def acc(steps):
        hits = []
        for e in test_episodes:
            with torch.no_grad():  # as at evaluation: adaptation must still take gradient steps
                logits = head.episode_logits(xt[e.support], torch.from_numpy(e.support_labels), xt[e.query],
                                             5, steps=steps)
            assert not logits.requires_grad
            hits.append((logits.argmax(1).numpy() == e.query_labels).mean())
        return float(np.mean(hits))

    adapted, unadapted = acc(None), acc(0)
    assert adapted > unadapted + 0.3, (adapted, unadapted)  # without adaptation: chance (0.2)
    assert adapted > identity_acc + 0.2, (adapted, identity_acc)
    # transform() (the body's normalised projection) also backs nearest-prototype search, as in a registry
    assert accuracy(head, x_test, y_test, test_episodes) > identity_acc + 0.2


@pytest.mark.parametrize("name", ["anil", "maml"])
def test_adaptive_heads_work_under_no_grad_and_inference_mode(name):
    x, y = low_variance_signal(2, 8, dim=12, noise=0.5)
    head = create_head(name, 12, hidden=16, out_dim=8, ways=3).eval()
    s, sl = torch.from_numpy(x[[0, 10, 20]]), torch.tensor([0, 1, 2])
    q = torch.from_numpy(x[[1, 11, 21, 2]])
    reference = head.episode_logits(s, sl, q, 3)
    with torch.no_grad():
        under_no_grad = head.episode_logits(s, sl, q, 3)
    with torch.inference_mode():
        si, qi = s.clone(), q.clone()  # inference tensors, as an inference-mode caller would pass
        under_inference = head.episode_logits(si, sl.clone(), qi, 3)
    torch.testing.assert_close(under_no_grad, reference.detach())
    torch.testing.assert_close(under_inference, reference.detach())
    assert all(p.grad is None for p in head.parameters())  # evaluation leaves no gradients behind
    # a 7-way episode on a 3-row classifier: rows are reused cyclically as initial class weights
    assert head.episode_logits(torch.from_numpy(x[:70:10]), torch.arange(7), q, 7).shape == (4, 7)


# ---------------------------------------------------------------- the loop itself

def test_training_is_reproducible_from_the_seed():
    x, y = low_variance_signal(3, 12, dim=10)

    def run(seed):
        torch.manual_seed(1234)
        before = torch.rand(1)
        torch.manual_seed(1234)
        head = create_head("protonet", 10, hidden=16, out_dim=8, dropout=0.3)  # dropout draws random numbers
        train_head(head, x, y, ways=4, queries=3, episodes=40, seed=seed, progress=False)
        assert torch.equal(torch.rand(1), before)  # the caller's RNG is left as it was
        return head.state_dict()

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_early_stopping_triggers_and_restores_the_best_weights():
    # Train classes carry their signal in dims 0-3 (and noise in 4-7); validation classes carry theirs
    # in dims 4-7: the more training suppresses dims 4-7, the worse validation gets.
    x, y = low_variance_signal(4, 30, dim=16, signal_dims=4, noise=1.5)
    vx, vy = low_variance_signal(5, 10, dim=16, signal_dims=4, noise=0.2, spread=0.2, signal_at=4)
    head = create_head("protonet", 16, hidden=32, out_dim=8, dropout=0.0)
    result = train_head(head, x, y, ways=5, queries=5, episodes=1000, lr=3e-3, val_features=vx, val_labels=vy,
                        val_episodes=30, val_every=20, patience=3, progress=False)
    assert isinstance(result, TrainResult) and result.stopped_early
    # The untrained head is validated first and is a candidate like any trained state (episode 0).
    accs = [result.initial_val_accuracy] + [p["val_accuracy"] for p in result.history]
    episodes = [0] + [p["episode"] for p in result.history]
    assert result.episodes_run < 1000 and result.episodes_run == result.history[-1]["episode"]
    assert result.best_val_accuracy == max(accs) > accs[-1]
    assert [p["episode"] for p in result.history] == list(range(20, result.episodes_run + 1, 20))
    assert result.best_episode == episodes[int(np.argmax(accs))]
    assert len(accs) - 1 - int(np.argmax(accs)) == 3  # stopped after exactly `patience` bad validations
    # The same fixed validation episodes, scored independently with the returned weights: the best.
    val_episodes = EpisodeSampler(vy, ways=5, shots=1, queries=5, seed=0).sample_many(30)
    assert accuracy(head, vx, vy, val_episodes) == pytest.approx(result.best_val_accuracy, abs=1e-6)


def test_without_validation_the_last_weights_are_kept_and_history_has_train_metrics():
    x, y = low_variance_signal(6, 12, dim=10)
    head = create_head("protonet", 10, hidden=16, out_dim=8)
    result = train_head(head, x, y, ways=4, queries=3, episodes=50, val_every=20, patience=1, progress=False)
    assert (result.best_val_accuracy, result.best_episode, result.episodes_run, result.stopped_early) == \
        (None, 50, 50, False)
    assert [p["episode"] for p in result.history] == [20, 40, 50]
    assert all(p["val_accuracy"] is None and 0 <= p["train_accuracy"] <= 1 and p["train_loss"] > 0
               for p in result.history)
    assert not head.training  # left ready for inference


def test_identity_head_is_fitted_without_episodes():
    x = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    head = create_head("identity", 2)
    result = train_head(head, x, np.array(["a", "b"]), ways=20, episodes=5000)  # 2 classes: no episodes possible
    assert result.episodes_run == 0 and result.history == []
    np.testing.assert_allclose(head.mean.numpy(), [2.0, 3.0])


def test_progress_false_is_silent_and_threads_are_restored(capsys):
    x, y = low_variance_signal(7, 8, dim=6)
    torch.set_num_threads(2)
    train_head(create_head("protonet", 6, hidden=8, out_dim=4), x, y, ways=3, queries=2, episodes=5,
               progress=False)
    assert torch.get_num_threads() == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    train_head(create_head("protonet", 6, hidden=8, out_dim=4), x, y, ways=3, queries=2, episodes=5,
               progress=True)
    assert "training" in capsys.readouterr().err


def test_within_group_training_and_argument_errors():
    x, y = low_variance_signal(8, 12, dim=8)
    groups = y // 4  # three "alphabets" of four classes
    head = create_head("protonet", 8, hidden=8, out_dim=4)
    result = train_head(head, x, y, groups=groups, within_group=True, ways=4, queries=3, episodes=10,
                        progress=False)
    assert result.episodes_run == 10
    with pytest.raises(ValueError, match="ways=5"):  # no group has five classes
        train_head(head, x, y, groups=groups, within_group=True, ways=5, episodes=10, progress=False)
    with pytest.raises(ValueError, match="val_groups"):
        train_head(head, x, y, groups=groups, within_group=True, ways=4, val_features=x, val_labels=y,
                   progress=False)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        train_head(head, x[:, :5], y, progress=False)
    with pytest.raises(ValueError, match="one label per"):
        train_head(head, x, y[:-1], progress=False)
    with pytest.raises(ValueError, match="val_labels"):
        train_head(head, x, y, val_features=x, progress=False)


def test_residual_head_starts_at_raw_features_and_never_ends_below_them():
    # Validation classes carry their signal where training suppresses it: every trained state is worse
    # than raw features, so the kept head must be the untrained one, which is exactly the raw features.
    x, y = low_variance_signal(4, 30, dim=16, signal_dims=4, noise=1.5)
    vx, vy = low_variance_signal(5, 10, dim=16, signal_dims=4, noise=0.2, spread=0.2, signal_at=4)
    head = create_head("protonet", 16, hidden=32, distance="cosine", residual=True, dropout=0.0)
    assert head.out_dim == 16
    unit = vx / np.linalg.norm(vx, axis=1, keepdims=True)
    np.testing.assert_allclose(head.transform(vx), unit, atol=1e-6)  # untrained = raw features
    result = train_head(head, x, y, ways=5, queries=5, episodes=200, lr=3e-3, val_features=vx, val_labels=vy,
                        val_episodes=30, val_every=20, patience=3, progress=False)
    assert result.initial_val_accuracy == pytest.approx(result.raw_val_accuracy, abs=1e-9)
    assert result.best_val_accuracy >= result.raw_val_accuracy
    assert min(p["val_accuracy"] for p in result.history) < result.raw_val_accuracy  # training did hurt
    np.testing.assert_allclose(head.transform(vx), unit, atol=1e-6)  # and the untrained state was kept


def test_residual_needs_the_mlp_projection():
    with pytest.raises(ValueError, match="residual"):
        create_head("protonet", 16, in_shape=(4, 2, 2), arch="conv", residual=True)
