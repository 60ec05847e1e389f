"""The package's shape, checked from its source: the model layer depends on nothing above it, no module imports
another that imports it back (function-level imports count too: a lazy import is still a circle), and only the
one atomic writer renames files into place."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deepsail"
CORE = {"deepsail.files", "deepsail.precision", "deepsail.flags", "deepsail.errors"}  # helpers any layer may use


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the deepsail modules it imports anywhere in its source (package __init__ when not a module)."""
    edges: dict[str, set[str]] = {}
    for name, file in mods.items():
        package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("deepsail")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if base.startswith("deepsail"):
                    found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names}
        edges[name] = {e for e in found if e in mods and e != name}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_model_imports_nothing_from_the_layers_above():
    edges = _imports(_modules())
    model = {m for m in edges if m == "deepsail.model" or m.startswith("deepsail.model.")}
    assert len(model) >= 8
    bad = {m: sorted(e for e in edges[m] if e not in model and e not in CORE) for m in model}
    assert not any(bad.values()), {m: e for m, e in bad.items() if e}


def test_no_import_cycles():
    edges = _imports(_modules())
    assert len(edges) > 40
    assert _cycles(edges) == []
    # the checker itself finds a cycle when there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_files_are_renamed_into_place_only_by_the_atomic_writer():
    offenders = []
    for name, file in _modules().items():
        if name == "deepsail.files":
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("replace", "rename")
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
            ):
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, f"use deepsail.files (atomic_path / atomic_dir / publish) instead of os.replace: {offenders}"
