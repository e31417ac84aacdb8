"""The package's module import graph: floors (longest import chain below each module), cycles, private imports.

Every ``import`` statement counts, also those inside functions (a lazy import still ties the modules together)
and those under ``if TYPE_CHECKING:`` (an annotation still does), except in a package ``__init__``, whose
``TYPE_CHECKING`` block only mirrors its lazy re-exports.
Run: ``python benchmarks/import_graph.py [package_dir]``; the same graph backs ``tests/test_architecture.py``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, package_dir: Path) -> str:
    """Dotted module name of ``path`` inside the package at ``package_dir``."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, *, type_checking: bool = True):
    """Import nodes of ``tree`` at any depth; ``type_checking=False`` skips ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def parse_package(package_dir: Path) -> dict[str, tuple[Path, ast.Module]]:
    """Module name -> (file, parsed AST) for every ``.py`` file of the package."""
    return {module_name(p, package_dir): (p, ast.parse(p.read_text(), str(p)))
            for p in sorted(package_dir.rglob("*.py"))}


def import_edges(modules: dict[str, tuple[Path, ast.Module]]):
    """Yield ``(importer, imported module, imported name or None, line)`` for imports of package modules.

    ``from .pkg import sub`` counts as an import of ``pkg.sub`` when ``sub`` is a module, else of ``pkg``.
    """
    top = min(modules, key=len)
    for name, (path, tree) in modules.items():
        is_pkg = path.name == "__init__.py"
        # A package __init__'s TYPE_CHECKING block only mirrors its lazy re-exports for IDEs; elsewhere an
        # annotation-only import still ties two modules together, so it counts.
        for node in _imports(tree, type_checking=not is_pkg):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == top or alias.name.startswith(top + "."):
                        target = alias.name
                        while target not in modules and "." in target:
                            target = target.rsplit(".", 1)[0]
                        yield name, target, None, node.lineno
                continue
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == top or target.startswith(top + ".")):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    yield name, sub, None, node.lineno
                else:
                    yield name, target, alias.name, node.lineno


def graph(modules) -> dict[str, set[str]]:
    """Module -> the package modules it imports, self-imports dropped.

    Importing ``a.b.c`` first runs the ``__init__`` of ``a.b`` (and ``a``), so those count as imported too,
    except packages that enclose the importer (they are being imported already when it runs).
    """
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for src, dst, _, _ in import_edges(modules):
        parts = dst.split(".")
        for n in range(1, len(parts) + 1):
            target = ".".join(parts[:n])
            encloses = src.startswith(target + ".") or (target == src)
            if target in modules and not encloses and target != dst.split(".")[0]:
                edges[src].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def floors(edges: dict[str, set[str]]) -> dict[str, int]:
    """Floor of each module: 0 if it imports no package module, else 1 + the highest floor it imports.

    Modules in one cycle share a floor (the cycle is collapsed first).
    """
    comp_of = {m: m for m in edges}
    for comp in cycles(edges):
        for m in comp:
            comp_of[m] = comp[0]
    memo: dict[str, int] = {}

    def floor(c: str) -> int:
        if c not in memo:
            memo[c] = 0
            below = {comp_of[d] for m in edges if comp_of[m] == c for d in edges[m]} - {c}
            memo[c] = 1 + max(map(floor, below)) if below else 0
        return memo[c]

    return {m: floor(comp_of[m]) for m in edges}


def private_imports(modules) -> list[str]:
    """Private names used across modules (``module:line: what``): ``from X import _name`` where X is another
    package module, and any import of a private module (``pkg._mod``) from outside ``pkg``."""
    found = []
    for src, dst, name, line in import_edges(modules):
        if name and name.startswith("_") and not name.startswith("__") and dst != src:
            found.append(f"{src}:{line}: {dst}.{name}")
        parts = dst.split(".")
        for i, part in enumerate(parts[1:], start=1):
            owner = ".".join(parts[:i])
            if part.startswith("_") and not part.startswith("__") and not (src == owner or src.startswith(owner + ".")):
                found.append(f"{src}:{line}: {dst}")
                break
    return sorted(set(found))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package_dir", nargs="?", default=str(ROOT / "fewshot"))
    args = parser.parse_args(argv)
    modules = parse_package(Path(args.package_dir).resolve())
    edges = graph(modules)
    levels = floors(edges)
    out = []
    for level in range(max(levels.values()) + 1):
        names = sorted(m for m, f in levels.items() if f == level)
        out.append(f"floor {level:2d} ({len(names)}): " + ", ".join(names))
    found = cycles(edges)
    out.append(f"cycles: {len(found)}")
    out.extend("  " + " <-> ".join(c) for c in found)
    private = private_imports(modules)
    out.append(f"private imports across modules: {len(private)}")
    out.extend("  " + p for p in private)
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
