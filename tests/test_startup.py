"""Start-up: `import fewshot` and the commands that never run a model must not import torch.

Each check runs in a fresh interpreter (this test process has torch loaded already) and asserts on
``sys.modules`` after the code path, not on a timing: benchmarks/startup.py measures the seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

HEAVY = ("torch", "timm", "torchvision")


def _heavy_modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; return which heavy modules it ended up importing."""
    probe = (f"import sys\n{code}\n"
             f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY="):].split(",") if m]


def _cli(args: list) -> str:
    """Code that runs the CLI with ``args`` the way the `fewshot` script does (exit included)."""
    return ("from fewshot.cli import main\n"
            f"try:\n    code = main({args!r})\nexcept SystemExit as e:\n    code = e.code\n"
            "assert code in (0, None), code")


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
