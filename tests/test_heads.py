"""Heads: the registry by name, the shared contract, distances, and safe save/load."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot.learning.heads import (
    Head,
    HeadFormatError,
    available_heads,
    create_head,
    load_head,
    save_head,
)

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blobs(seed=0, n_classes=6, per_class=4, dim=12):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 3
    y = np.repeat(np.arange(n_classes), per_class)
    return (centres[y] + rng.normal(size=(len(y), dim))).astype(np.float32), y


# ---------------------------------------------------------------- registry and construction

def test_registry_knows_every_head_and_rejects_unknown_names_and_params():
    assert set(available_heads()) >= {"identity", "protonet", "metric", "anil", "maml"}
    with pytest.raises(ValueError, match="protonet"):  # the message lists what is available
        create_head("protonett", 8)
    with pytest.raises(ValueError, match="hiden"):
        create_head("protonet", 8, hiden=16)
    with pytest.raises(ValueError, match="distance"):
        create_head("protonet", 8, distance="manhattan")
    head = create_head("protonet", 8, hidden=16, out_dim=4)
    assert isinstance(head, Head) and head.name == "protonet" and head.out_dim == 4 and head.metric == "l2"
    assert create_head("protonet", 8, distance="cosine").metric == "cosine"
    assert json.loads(json.dumps(head.config))["hidden"] == 16
    assert create_head(**head.config).config == head.config  # the config rebuilds the head


def test_conv_arch_needs_a_matching_in_shape():
    with pytest.raises(ValueError, match="in_shape"):
        create_head("protonet", 48, arch="conv")
    with pytest.raises(ValueError, match="in_shape"):
        create_head("protonet", 48, arch="conv", in_shape=(3, 4, 5))  # 60 values, not 48
    head = create_head("protonet", 48, arch="conv", in_shape=(3, 4, 4), channels=8, out_dim=5)
    assert head.transform(np.zeros((7, 48), np.float32)).shape == (7, 5)


def test_same_seed_same_initial_weights_and_caller_rng_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b = create_head("metric", 10, seed=7), create_head("metric", 10, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # creating heads did not consume the global RNG
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    c = create_head("metric", 10, seed=8)
    assert not torch.equal(a.state_dict()["body.0.weight"], c.state_dict()["body.0.weight"])


def test_transform_checks_the_input_and_returns_float32():
    head = create_head("protonet", 6, hidden=8, out_dim=3)
    out = head.transform(np.ones((5, 6), dtype=np.float64))
    assert out.dtype == np.float32 and out.shape == (5, 3)
    assert head.training  # transform switches to eval mode and back
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        head.transform(np.ones((5, 7)))


# ---------------------------------------------------------------- identity (SimpleShot CL2N)

def test_identity_head_centres_on_the_base_mean_then_normalises():
    head = create_head("identity", 2)
    base = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]], dtype=np.float32)  # mean (2, 1)
    result = head.fit(base, labels=[0, 1, 2])
    assert result.episodes_run == 0 and result.history == [] and result.best_val_accuracy is None
    np.testing.assert_allclose(head.mean.numpy(), [2.0, 1.0])
    out = head.transform(np.array([[2.0, 4.0], [5.0, 1.0], [1.0, 0.0]]))
    # (0, 3) -> (0, 1); (3, 0) -> (1, 0); (-1, -1) -> (-1, -1)/sqrt(2)
    np.testing.assert_allclose(out, [[0, 1], [1, 0], [-2**-0.5, -2**-0.5]], atol=1e-6)
    assert head.metric == "cosine" and head.episodic is False
    plain = create_head("identity", 2, center=False).transform(np.array([[3.0, 4.0]]))
    np.testing.assert_allclose(plain, [[0.6, 0.8]], atol=1e-6)


# ---------------------------------------------------------------- whitening (domain statistics)

def test_whitening_head_equalises_the_domain_variance_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    scales = np.array([4.0, 2.0, 1.0, 0.5])
    domain = rng.normal(size=(2000, 4)) * scales + 3.0
    head = create_head("whitening", 4, shrinkage=0.001)
    head.fit(domain)
    np.testing.assert_allclose(head.mean.numpy(), domain.mean(axis=0), rtol=1e-5)
    white = (domain - domain.mean(axis=0)) @ head.matrix.numpy().astype(np.float64)
    spread = white.std(axis=0)
    assert spread.max() / spread.min() < 1.1  # every direction weighs alike (before the unit-length step)
    centring_only = create_head("whitening", 4, shrinkage=1.0)
    centring_only.fit(domain)
    identity = create_head("identity", 4)
    identity.fit(domain)
    np.testing.assert_allclose(centring_only.transform(domain[:5]), identity.transform(domain[:5]), atol=1e-5)
    saved = load_head(save_head(head, tmp_path / "w"))
    np.testing.assert_array_equal(saved.transform(domain[:5]), head.transform(domain[:5]))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="shrinkage"):
            create_head("whitening", 4, shrinkage=bad)
    with pytest.raises(ValueError, match="identity head"):
        create_head("whitening", 5000)


# ---------------------------------------------------------------- distances

@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_episode_logits_match_a_numpy_nearest_prototype_computation(distance):
    rng = np.random.default_rng(1)
    head = create_head("protonet", 6, hidden=16, out_dim=4, distance=distance, init_scale=7.0).eval()
    support = rng.normal(size=(6, 6)).astype(np.float32)
    support_labels = np.array([2, 0, 1, 0, 2, 1])  # two shots per way, in no particular order
    query = rng.normal(size=(5, 6)).astype(np.float32)
    with torch.no_grad():
        logits = head.episode_logits(torch.from_numpy(support), torch.from_numpy(support_labels),
                                     torch.from_numpy(query), 3).numpy()
    zs, zq = head.transform(support).astype(np.float64), head.transform(query).astype(np.float64)
    if distance == "cosine":
        unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
        protos = unit(np.stack([unit(zs)[support_labels == c].mean(0) for c in range(3)]))
        expected = 7.0 * unit(zq) @ protos.T
    else:
        protos = np.stack([zs[support_labels == c].mean(0) for c in range(3)])
        expected = -((zq[:, None, :] - protos[None]) ** 2).sum(-1)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_default_loss_is_cross_entropy_of_the_episode_logits():
    head = create_head("protonet", 5, hidden=8, out_dim=3).eval()
    s, q = torch.randn(4, 5), torch.randn(6, 5)
    sl, ql = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 1, 0, 0, 1])
    expected = torch.nn.functional.cross_entropy(head.episode_logits(s, sl, q, 2), ql)
    assert torch.allclose(head.loss(s, sl, q, ql, 2), expected)


# ---------------------------------------------------------------- save / load

def _trained(name, **params):
    x, y = blobs()
    dim = x.shape[1]
    if params.get("arch") == "conv":
        params["in_shape"] = (3, 2, 2)
    if params.get("loss") == "arcface":
        params["num_classes"] = 6
    head = create_head(name, dim, **params)
    head.fit(x, y, ways=3, shots=1, queries=2, episodes=3, val_every=3, progress=False)
    return head, x


@pytest.mark.parametrize("name,params", [
    ("identity", {}),
    ("protonet", {"hidden": 16, "out_dim": 4}),  # BatchNorm running statistics must survive too
    ("protonet", {"arch": "conv", "channels": 4, "out_dim": 4, "distance": "cosine"}),
    ("metric", {"hidden": 16, "out_dim": 4, "loss": "arcface"}),
    ("anil", {"hidden": 16, "out_dim": 4, "ways": 3}),
    ("maml", {"hidden": 16, "out_dim": 4, "ways": 3, "inner_steps": 2}),
])
def test_save_load_round_trip_is_exact(tmp_path, name, params):
    head, x = _trained(name, **params)
    head.metadata["encoder"] = {"name": "tiny", "sha256": "ab" * 32}
    saved = save_head(head, tmp_path / "head")
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "weights.safetensors"]
    loaded = load_head(saved)
    assert type(loaded) is type(head) and loaded.config == head.config and loaded.metadata == head.metadata
    assert loaded.fingerprint == head.fingerprint
    np.testing.assert_array_equal(loaded.transform(x), head.transform(x))
    if head.adapts:  # adapted predictions are the same function too
        s, sl, q = torch.from_numpy(x[:3]), torch.tensor([0, 1, 2]), torch.from_numpy(x[3:9])
        head.eval()
        assert torch.equal(loaded.episode_logits(s, sl, q, 3), head.episode_logits(s, sl, q, 3))
    assert not [p for p in tmp_path.iterdir() if p.name != "head"]  # no temporary directories left


def test_save_replaces_a_saved_head_but_never_other_data(tmp_path):
    first, second = create_head("protonet", 4, seed=1), create_head("protonet", 4, seed=2)
    save_head(first, tmp_path / "h")
    save_head(second, tmp_path / "h")
    assert load_head(tmp_path / "h").fingerprint == second.fingerprint
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        save_head(first, other)
    assert (other / "holiday.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h", "photos"]
    first.metadata["bad"] = object()
    with pytest.raises(ValueError, match="metadata"):
        save_head(first, tmp_path / "h")
    assert load_head(tmp_path / "h").fingerprint == second.fingerprint  # a failed save changes nothing


def test_tampered_weights_are_rejected_naming_the_file(tmp_path):
    path = save_head(create_head("protonet", 8, hidden=8, out_dim=4), tmp_path / "head")
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(HeadFormatError, match="weights.safetensors") as info:
        load_head(path)
    assert isinstance(info.value, ValueError)


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker directory
        return (os.mkdir, (self.marker,))


def test_a_planted_pickle_is_never_executed(tmp_path):
    path = save_head(create_head("protonet", 8, hidden=8, out_dim=4), tmp_path / "head")
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"body.0.weight": _Planted(str(marker))})
    (path / "weights.safetensors").write_bytes(payload)
    meta = json.loads((path / "config.json").read_text())
    import hashlib

    from fewshot.learning.base import canonical_json

    meta["weights_sha256"] = hashlib.sha256(payload).hexdigest()  # an attacker can fix up the hashes
    meta["fingerprint"]["sha256"] = hashlib.sha256(canonical_json(meta["config"]).encode() + payload).hexdigest()
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(HeadFormatError, match="weights.safetensors"):
        load_head(path)
    assert not marker.exists()


def test_load_errors_are_typed_and_name_the_file(tmp_path):
    with pytest.raises(HeadFormatError, match="not a directory"):
        load_head(tmp_path / "missing")
    path = save_head(create_head("protonet", 8, hidden=8, out_dim=4), tmp_path / "head")
    config = path / "config.json"
    good = config.read_text()

    def expect(text, match):
        config.write_text(text)
        with pytest.raises(HeadFormatError, match=match):
            load_head(path)

    expect("{not json", "config.json")
    meta = json.loads(good)
    expect(json.dumps({**meta, "format_version": 99}), "version 99")
    expect(json.dumps({**meta, "config": {**meta["config"], "name": "nohead"}}), "unknown head 'nohead'")
    # an edited config is caught (here its shapes no longer fit the weights; same shapes: the checksum)
    expect(json.dumps({**meta, "config": {**meta["config"], "hidden": 9}}), "do not fit")
    # re-sealed, a config that does not describe these weights (hidden 8 -> 9): refused, never reshaped
    config.write_text(good)
    _edit_config(path, reseal=True, hidden=9)
    with pytest.raises(HeadFormatError, match="do not fit"):
        load_head(path)
    # nor does a hostile config get to allocate memory: sizes have limits
    _edit_config(path, reseal=True, hidden=10**12)
    with pytest.raises(HeadFormatError, match="hidden must be at most"):
        load_head(path)
    config.write_text(good)
    assert load_head(path).config["hidden"] == 8


def test_fingerprint_follows_weights_and_config():
    head = create_head("protonet", 6, hidden=8, out_dim=3)
    fp = head.fingerprint
    assert fp == head.fingerprint and fp["name"] == "protonet" and len(fp["sha256"]) == 64
    with torch.no_grad():
        head.body[0].weight[0, 0] += 1e-3
    assert head.fingerprint != fp
    # same (zero) weights, different config -> different fingerprint
    assert create_head("identity", 6).fingerprint != create_head("identity", 6, center=False).fingerprint


# ---------------------------------------------------------------- learn2learn stays optional

def test_heads_work_without_learn2learn_and_maml_says_how_to_get_it():
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import fewshot, fewshot.learning.heads, fewshot.learning.train, fewshot.evaluation.learn2learn
        from fewshot.learning.heads import create_head
        create_head("metric", 8)
        assert "learn2learn" not in sys.modules, "importing fewshot or its heads imported learn2learn"
        sys.modules["learn2learn"] = None  # from here on, as if it were not installed
        head = create_head("protonet", 8, hidden=8, out_dim=4)
        head.fit(np.random.default_rng(0).normal(size=(40, 8)), np.repeat(np.arange(8), 5), ways=3, queries=2,
                 episodes=2, progress=False)
        assert head.transform(np.zeros((2, 8))).shape == (2, 4)
        for name in ("maml", "anil"):
            try:
                create_head(name, 8)
            except ImportError as e:
                assert "make learn2learn" in str(e), e
            else:
                raise AssertionError(name + " was created without learn2learn")
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_head_honours_the_umask(tmp_path, umask):
    """Another user of a shared machine can read a head made under umask 022 (and cannot under 077)."""
    old = os.umask(umask)
    try:
        saved = save_head(create_head("protonet", 4, seed=1), tmp_path / "head")
    finally:
        os.umask(old)
    assert saved.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in saved.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def _edit_config(path: Path, reseal: bool, **changes) -> None:
    """Change config.json's head config; with ``reseal`` also recompute its fingerprint (as an attacker
    who knows the format would), so only the limits can catch it."""
    import hashlib

    from fewshot.learning.base import canonical_json

    meta = json.loads((path / "config.json").read_text())
    meta["config"].update(changes)
    if reseal:
        digest = hashlib.sha256(canonical_json(meta["config"]).encode())
        digest.update((path / "weights.safetensors").read_bytes())
        meta["fingerprint"]["sha256"] = digest.hexdigest()
    (path / "config.json").write_text(json.dumps(meta))


def test_head_config_is_covered_by_the_checksum(tmp_path):
    saved = save_head(create_head("protonet", 4, seed=1, hidden=8, out_dim=4), tmp_path / "head")
    _edit_config(saved, reseal=False, dropout=0.5)  # same shapes, so the weights still fit
    with pytest.raises(HeadFormatError, match="checksum"):
        load_head(saved)


@pytest.mark.parametrize("name, changes", [
    ("maml", {"inner_steps": 10**12}),
    ("protonet", {"hidden": 10**9}),
    ("protonet", {"arch": "conv", "in_shape": [1, 2, 2], "channels": 10**9}),
    ("protonet", {"in_dim": 10**12}),
    ("protonet", {"seed": 2**70}),
])
def test_resealed_head_config_with_absurd_sizes_is_refused_before_building(tmp_path, name, changes):
    """A config that asks for endless inner steps or a billion channels is refused with a clear error
    (never a raw traceback, never minutes of work or gigabytes of memory)."""
    import time

    params = {"hidden": 8, "out_dim": 4} | ({"ways": 3, "inner_steps": 1} if name == "maml" else {})
    saved = save_head(create_head(name, 4, seed=1, **params), tmp_path / "head")
    _edit_config(saved, reseal=True, **changes)
    start = time.monotonic()
    with pytest.raises(HeadFormatError, match=next(iter(changes)) if "in_shape" not in changes else "channels"):
        load_head(saved)
    assert time.monotonic() - start < 5


def _sparse_weights_attack(path: Path, declared_bytes: int) -> None:
    """Replace a saved head's weights by a sparse file of zeros whose safetensors header declares one
    huge float32 tensor under a real name, and reseal both checksums as an attacker would: the directory
    stays a few KB on disk."""
    import hashlib

    from fewshot.learning.base import canonical_json

    weights = path / "weights.safetensors"
    header = json.dumps({"body.0.weight": {"dtype": "F32", "shape": [declared_bytes // 4],
                                           "data_offsets": [0, declared_bytes]}}).encode()
    with open(weights, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + declared_bytes)  # a hole, not written zeros
    weights_digest, config_digest = hashlib.sha256(), hashlib.sha256()
    meta = json.loads((path / "config.json").read_text())
    config_digest.update(canonical_json(meta["config"]).encode())
    with open(weights, "rb") as f:
        while chunk := f.read(1 << 24):
            weights_digest.update(chunk)
            config_digest.update(chunk)
    meta["weights_sha256"], meta["fingerprint"]["sha256"] = weights_digest.hexdigest(), config_digest.hexdigest()
    (path / "config.json").write_text(json.dumps(meta))


def test_a_sparse_weights_file_declaring_a_huge_tensor_is_refused_without_reading_it(tmp_path):
    """A head directory of a few KB whose weights file is a 256 MiB hole (checksums resealed): load_head
    compares the safetensors header with the config and refuses it before reading or hashing the file."""
    import time
    import tracemalloc

    saved = save_head(create_head("protonet", 8, hidden=8, out_dim=4), tmp_path / "head")
    _sparse_weights_attack(saved, declared_bytes=1 << 28)
    assert (saved / "weights.safetensors").stat().st_blocks * 512 < 1 << 20  # really sparse here
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(HeadFormatError) as refused:
            load_head(saved)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"load_head allocated {peak >> 20} MiB for a refused head"
    assert time.monotonic() - start < 2
    assert refused.match(r"weights\.safetensors: weights do not fit.*save the head again")


def test_weights_that_are_longer_than_their_tensors_or_a_config_asking_for_too_much_are_refused(tmp_path):
    saved = save_head(create_head("protonet", 8, hidden=8, out_dim=4), tmp_path / "head")
    weights = saved / "weights.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good + b"\0" * 64)  # trailing bytes no tensor declares
    with pytest.raises(HeadFormatError, match="bytes where its tensors need"):
        load_head(saved)
    weights.write_bytes(good)
    # resealed config asking for 4M x 4096 float32 weights (64 GiB): refused from the config alone
    _edit_config(saved, reseal=True, in_dim=2**22, hidden=2**12)
    with pytest.raises(HeadFormatError, match="config.json: the 'protonet' head in it needs .* more than"):
        load_head(saved)
