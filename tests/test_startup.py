"""Start-up: `import fewshot` and the commands that never run a model must not import torch.

Each check runs in a fresh interpreter (this test process has torch loaded already) and asserts on
``sys.modules`` after the code path, not on a timing: benchmarks/startup.py measures the seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

HEAVY = ("torch", "timm", "torchvision")


def _heavy_modules_after(code: str, env: dict | None = None) -> list[str]:
    """Run ``code`` in a fresh interpreter (with ``env`` added to its environment); return which heavy modules it
    ended up importing."""
    probe = (f"import sys\n{code}\n"
             f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **(env or {})})
    assert done.returncode == 0, done.stderr
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY="):].split(",") if m]


def _cli(args: list, ok: tuple = (0, None)) -> str:
    """Code that runs the CLI with ``args`` the way the `fewshot` script does (exit included), asserting its exit
    status is one of ``ok``."""
    return ("from fewshot.cli import main\n"
            f"try:\n    code = main({args!r})\nexcept SystemExit as e:\n    code = e.code\n"
            f"assert code in {ok!r}, code")


@pytest.fixture
def registry_dir(tmp_path) -> str:
    from fewshot import Registry

    reg = Registry(8, fingerprint={"name": "test-vectors"})
    reg.add_many(["cat", "dog", "mug"], np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32))
    reg.save(tmp_path / "reg")
    return str(tmp_path / "reg")


def test_import_fewshot_does_not_import_torch():
    assert _heavy_modules_after("import fewshot; fewshot.__version__") == []


def test_public_names_still_resolve_on_first_use():
    code = ("import fewshot\n"
            "missing = [n for n in fewshot.__all__ if not hasattr(fewshot, n)]\n"
            "assert not missing, missing\n"
            "import fewshot.registry\n"
            "assert fewshot.Registry is fewshot.registry.Registry")
    assert "torch" in _heavy_modules_after(code)  # resolving the encoder names does load torch, as it must


def test_unknown_attribute_is_an_attribute_error():
    import fewshot

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fewshot.nope  # noqa: B018


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["classes", "--help"], ["predict", "--help"]])
def test_version_and_help_do_not_import_torch(args):
    assert _heavy_modules_after(_cli(args)) == []


def test_classes_remove_rename_do_not_import_torch(registry_dir):
    code = "\n".join([_cli(["classes", registry_dir, "--json"]), _cli(["rename", registry_dir, "cat", "kitten"]),
                      _cli(["remove", registry_dir, "--class", "dog"])])
    assert _heavy_modules_after(code) == []
    listed = subprocess.run([sys.executable, "-m", "fewshot", "classes", registry_dir, "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT)})
    assert [c["label"] for c in json.loads(listed.stdout)] == ["kitten", "mug"]


def test_classes_on_a_missing_registry_says_how_to_create_one(tmp_path, capsys):
    from fewshot.cli import main

    assert main(["classes", str(tmp_path / "none")]) == 1
    assert "fewshot register" in capsys.readouterr().err


@pytest.fixture(scope="module")
def photo_registry(encoder, photos, tmp_path_factory) -> str:
    """A real registry of three photo classes, its encoder's ONNX export cached (as after a first predict)."""
    from fewshot import FewShotClassifier
    from fewshot.embedding.onnx_encoder import export_onnx_parts

    classifier = FewShotClassifier(encoder, cache=False)
    for label in ("chelsea", "coffee", "rocket"):
        classifier.register(label, photos[label])
    path = str(tmp_path_factory.mktemp("photo-registry") / "reg")
    classifier.save(path)
    export_onnx_parts(encoder)
    return path


def test_predict_doctor_info_and_thumbnails_do_not_import_torch_once_the_export_is_cached(photo_registry, photos):
    queries = [str(photos[name]) for name in ("chelsea", "astronaut", "coins")]
    code = "\n".join([_cli(["predict", photo_registry, *queries, "--no-cache"]),
                      _cli(["predict", photo_registry, *queries, "--json"]),  # with the embedding cache too
                      _cli(["doctor", photo_registry], ok=(0, 1)), _cli(["info"]),
                      "from fewshot.registry.thumbnails import make_thumbnail",
                      f"assert make_thumbnail({str(photos['rocket'])!r}).startswith(b'\\xff\\xd8')"])
    assert _heavy_modules_after(code, env={"FEWSHOT_CACHE_DIR": os.environ["FEWSHOT_CACHE_DIR"]}) == []


def test_predict_json_without_torch_answers_as_the_torch_path(photo_registry, photos, capsys):
    from fewshot.cli import main

    queries = [str(photos[name]) for name in ("chelsea", "coffee", "astronaut", "coins", "camera")]
    queries += ["--json", "--no-cache", "--threshold", "0.6"]  # one example per class: a threshold that answers unknown
    done = subprocess.run([sys.executable, "-m", "fewshot", "predict", photo_registry, *queries], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    # Naming the encoder makes predict re-create it with torch: the path every earlier release took.
    assert main(["predict", photo_registry, *queries, "--encoder", "efficientnet_lite0"]) == 0
    onnx_answers, torch_answers = json.loads(done.stdout), json.loads(capsys.readouterr().out)
    assert {a["unknown"] for a in torch_answers} == {True, False}
    for o, t in zip(onnx_answers, torch_answers, strict=True):
        assert (o["input"], o["label"], o["unknown"]) == (t["input"], t["label"], t["unknown"])
        assert [c["label"] for c in o["top_k"]] == [c["label"] for c in t["top_k"]]
        assert abs(o["similarity"] - t["similarity"]) <= 1e-4 and abs(o["score"] - t["score"]) <= 1e-4
