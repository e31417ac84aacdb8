"""No code execution from files (issue #5, property 7).

A malicious pickle (its ``__reduce__`` creates a marker directory) is planted where each kind of
file fewshot reads is expected, with checksums fixed up where that is what it takes to reach the
parser. The marker must never appear, and the load must fail with a typed error (or, for the
embedding cache, which is only an accelerator, be ignored). A static check makes sure the package
source has no unpickling call at all.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import pickle
import sqlite3
from pathlib import Path

import warnings

import numpy as np
import pytest
import torch

from fewshot import EmbeddingCache, create_encoder, create_head, load_head, save_head
from fewshot.errors import HeadFormatError, RegistryFormatError, WeightsError
from fewshot.learning.base import canonical_json
from fewshot.registry import MANIFEST, Registry

from registry_fuzz import resealed_file

PACKAGE = Path(__file__).resolve().parents[1] / "fewshot"


class Planted:
    """Unpickling this creates the directory `marker`: proof that code from a file ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def payloads(marker: Path) -> dict[str, bytes]:
    """Malicious files in the formats a loader might be tempted to unpickle."""
    evil = Planted(str(marker))
    npy = io.BytesIO()
    np.save(npy, np.array([evil, 1], dtype=object), allow_pickle=True)  # an .npy holding a pickle
    torch_zip = io.BytesIO()
    torch.save({"conv_stem.weight": evil}, torch_zip)  # the zip format of torch.save
    return {"pickle": pickle.dumps({"weights": evil}), "npy with pickle": npy.getvalue(),
            "torch zip with pickle": torch_zip.getvalue()}


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "code planted in a file was executed"


@pytest.fixture
def saved_registry(tmp_path):
    reg = Registry(8, store_examples=True)
    reg.add_many(["a", "b"], np.eye(8)[:2])
    reg.save(tmp_path / "reg")
    return tmp_path / "reg"


def test_registry_files(saved_registry, marker):
    path = saved_registry
    files = {n: (path / n).read_bytes() for n in os.listdir(path) if not n.startswith(".")}
    planted = 0
    for name in files:
        for _kind, payload in payloads(marker).items():
            # checksums fixed up, so that the payload reaches the parser
            mutated = ({**files, MANIFEST: payload} if name == MANIFEST else resealed_file(files, name, payload))
            for n, data in mutated.items():
                (path / n).write_bytes(data)
            with pytest.raises(RegistryFormatError, match=str(path / name)):
                Registry.load(path)
            planted += 1
    assert planted == 6 * 3  # manifest, prototypes, index, examples, example ids, provenance x 3 payloads


def test_embedding_cache(tmp_path, marker, encoder, photos):
    """A pickle in the cache, as a vector blob (padded to the right size, so it is not skipped for
    that) or as the whole database file: never unpickled; the image is embedded as usual."""
    expected = encoder.embed([photos["coins"]])
    cache = EmbeddingCache(tmp_path / "cache.sqlite")
    digest = hashlib.sha256(photos["coins"].read_bytes()).hexdigest()
    for payload in payloads(marker).values():
        blob = (payload + b"\0" * (4 * encoder.dim))[:4 * encoder.dim]
        cache.put_many(encoder.fingerprint_id, {digest: np.zeros(encoder.dim)})
        with sqlite3.connect(tmp_path / "cache.sqlite") as db:
            db.execute("UPDATE embeddings SET vector = ?", (blob,))
        result = encoder.embed_batch([photos["coins"]], cache=cache)
        assert result.errors == [None]
    (tmp_path / "bad.sqlite").write_bytes(payloads(marker)["pickle"])
    with pytest.warns(RuntimeWarning, match="unusable"):
        result = encoder.embed_batch([photos["coins"]], cache=EmbeddingCache(tmp_path / "bad.sqlite"))
    np.testing.assert_allclose(result.vectors, expected, atol=1e-5)


def test_head_files(tmp_path, marker):
    path = save_head(create_head("protonet", 8, hidden=8, out_dim=4), tmp_path / "head")
    config, weights = (path / "config.json").read_bytes(), (path / "weights.safetensors").read_bytes()
    for payload in payloads(marker).values():
        (path / "config.json").write_bytes(payload)
        with pytest.raises(HeadFormatError, match="config.json"):
            load_head(path)
        meta = json.loads(config)
        meta["weights_sha256"] = hashlib.sha256(payload).hexdigest()  # reach the weights parser:
        meta["fingerprint"]["sha256"] = hashlib.sha256(canonical_json(meta["config"]).encode() + payload).hexdigest()
        (path / "config.json").write_text(json.dumps(meta))
        (path / "weights.safetensors").write_bytes(payload)
        with pytest.raises(HeadFormatError, match="weights.safetensors"):
            load_head(path)
    (path / "config.json").write_bytes(config)
    (path / "weights.safetensors").write_bytes(weights)
    load_head(path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors"])
def test_encoder_weights(tmp_path, marker, suffix):
    for kind, payload in payloads(marker).items():
        weights = tmp_path / f"evil-{kind.replace(' ', '-')}{suffix}"
        weights.write_bytes(payload)
        with pytest.raises(WeightsError, match=str(weights)), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch: "Detected pickle protocol 4 ..."
            create_encoder("tf_efficientnet_lite0", weights=weights)


def test_episode_manifests_and_protocols(tmp_path, marker):
    from fewshot.data.episodes import load_episodes
    from fewshot.data.protocols import load_protocol

    for payload in payloads(marker).values():
        (tmp_path / "episodes.json").write_bytes(payload)
        (tmp_path / "protocol.toml").write_bytes(payload)
        with pytest.raises(ValueError):
            load_episodes(tmp_path / "episodes.json", dataset=None)  # fails before it needs one
        with pytest.raises(ValueError):
            load_protocol(tmp_path / "protocol.toml")


# ---------------------------------------------------------------- the source itself

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_calls(source: str) -> list[str]:
    """Unpickling in Python source: imports of pickle-like modules, torch.load without
    weights_only=True, np.load without allow_pickle=False, allow_pickle=True, pandas.read_pickle,
    yaml.load, torch.jit.load."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}

            def is_const(key, value):
                return isinstance(keywords.get(key), ast.Constant) and keywords[key].value is value

            if name == "torch.load" and not is_const("weights_only", True):
                found.append(ast.unparse(node))
            if name in ("np.load", "numpy.load") and not is_const("allow_pickle", False):
                found.append(ast.unparse(node))
            if is_const("allow_pickle", True) or name.endswith(("read_pickle", "yaml.load", "jit.load")):
                found.append(ast.unparse(node))
    return found


def test_the_static_check_finds_unsafe_calls():
    bad = ("import pickle\nfrom joblib import load\nimport torch, numpy as np\ntorch.load(p)\n"
           "torch.load(p, weights_only=False)\nnp.load(p)\nnp.save(p, a, allow_pickle=True)\n")
    assert len(unsafe_calls(bad)) == 6
    assert unsafe_calls("torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p, allow_pickle=False)\n") == []


def test_no_unpickling_anywhere_in_the_package():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = {str(f.relative_to(PACKAGE)): unsafe_calls(f.read_text()) for f in files}
    assert not {k: v for k, v in found.items() if v}
    assert any("weights_only=True" in f.read_text() for f in files)  # the one torch.load there is
