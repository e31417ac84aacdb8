"""The package's structure: no import loops, no private names across modules, stages import only downward,
no module over 600 lines.

The import graph comes from every module's AST (benchmarks/import_graph.py, which prints it): imports inside
functions count (a lazy import still ties two modules together), so do ``if TYPE_CHECKING:`` imports (an annotation
still does) except in a package ``__init__``, where they only mirror its lazy re-exports, and importing ``a.b.c``
counts as importing the packages ``a.b`` too (their ``__init__`` runs first).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fewshot"
MAX_LINES = 600

_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "benchmarks" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)

# The stage of every module: the first prefix that matches, longest first. Foundations are the top-level helpers.
STAGES = {
    "fewshot.errors": "foundations", "fewshot.checks": "foundations", "fewshot.files": "foundations",
    "fewshot.streams": "foundations", "fewshot.lazy": "foundations",
    "fewshot.embedding": "embedding",
    "fewshot.registry": "registry",
    "fewshot.data": "data",
    "fewshot.evaluation": "evaluation",
    "fewshot.learning": "learning",
    "fewshot.classifier": "api", "fewshot.predictions": "api", "fewshot.workflows": "api",
    "fewshot.cli": "surfaces", "fewshot.serve": "surfaces", "fewshot.jobs": "surfaces", "fewshot.export": "surfaces",
    "fewshot.demo": "surfaces", "fewshot.__main__": "surfaces",
    "fewshot": "package",  # fewshot/__init__.py: lazy re-exports only
}

# What each stage may import besides itself. Evaluation sits below learning: training validates with the episodic
# scorer (evaluate_episodes) and adaptive heads use the learn2learn interop, while evaluation takes heads as objects
# and never imports learning.
ALLOWED = {
    "foundations": {"foundations"},
    "embedding": {"foundations"},
    "registry": {"foundations", "embedding"},
    "data": {"foundations", "embedding"},
    "evaluation": {"foundations", "embedding", "data", "registry"},
    "learning": {"foundations", "embedding", "data", "evaluation"},
    "api": {"foundations", "embedding", "registry", "data", "evaluation", "learning", "api"},
    "surfaces": {"foundations", "embedding", "registry", "data", "evaluation", "learning", "api", "surfaces",
                 "package"},
    "package": {"foundations"},  # fewshot/__init__.py: the lazy re-export helper only
}

# Modules allowed over MAX_LINES, each with the reason.
LONG_MODULES: dict[str, str] = {}


def stage(module: str) -> str:
    for prefix in sorted(STAGES, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return STAGES[prefix]
    raise AssertionError(f"{module} belongs to no stage: add it to STAGES in tests/test_architecture.py")


@pytest.fixture(scope="module")
def modules():
    return import_graph.parse_package(PACKAGE)


@pytest.fixture(scope="module")
def edges(modules):
    return import_graph.graph(modules)


def test_the_graph_sees_function_level_and_relative_imports(modules, edges):
    assert "fewshot.learning.train" in edges["fewshot.learning.heads.head"]  # module level, relative ..train
    assert "fewshot.embedding.runtime" in edges["fewshot.embedding.model"]  # imported inside a method
    assert "fewshot.learning.heads" in edges["fewshot.classifier"]  # a package: its __init__ runs


def test_a_planted_cycle_and_private_import_are_caught(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("from ..a import _helper\n\ndef g():\n    pass\n")
    planted = import_graph.parse_package(pkg)
    assert import_graph.cycles(import_graph.graph(planted)) == [["pkg.a", "pkg.sub.b"]]
    assert import_graph.private_imports(planted) == ["pkg.sub.b:1: pkg.a._helper"]


def test_an_annotation_only_import_ties_modules_except_in_a_package_init(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .a import A\n")
    (pkg / "a.py").write_text("from .b import g\n\nclass A:\n    pass\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .a import A\n\n"
                              "def g(a: A):\n    pass\n")
    planted = import_graph.graph(import_graph.parse_package(pkg))
    assert import_graph.cycles(planted) == [["pkg.a", "pkg.b"]]
    assert planted["pkg"] == set()


def test_every_package_import_resolves(modules):
    """A relative import that climbs wrong (``from .embedding.cache`` inside fewshot.embedding) fails only when
    its function runs: find it here."""
    missing = [f"{src}:{line}: {dst}" for src, dst, _, line in import_graph.import_edges(modules) if dst not in modules]
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_no_import_cycles(edges):
    found = import_graph.cycles(edges)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_private_names_imported_across_modules(modules):
    found = import_graph.private_imports(modules)
    assert not found, "make these names public, move them to their owner, or pass them in:\n" + "\n".join(found)


def test_stages_import_only_the_stages_below(edges):
    wrong = [f"{src} ({stage(src)}) imports {dst} ({stage(dst)})"
             for src, targets in sorted(edges.items()) for dst in sorted(targets)
             if stage(dst) != stage(src) and stage(dst) not in ALLOWED[stage(src)]]
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_stage(modules):
    for module in modules:
        stage(module)


def test_no_module_is_over_600_lines(modules):
    long = {name: len(path.read_text().splitlines()) for name, (path, _) in modules.items()}
    over = {name: n for name, n in long.items() if n > MAX_LINES and name not in LONG_MODULES}
    assert not over, f"split these modules (> {MAX_LINES} lines): {over}"


def test_subpackages_name_their_public_api(modules):
    for name, (path, tree) in modules.items():
        if path.name != "__init__.py" or name == "fewshot":
            continue
        assert ast.get_docstring(tree), f"{name}: no docstring"
        assert "__all__" in path.read_text(), f"{name}: no __all__ listing its public API"
