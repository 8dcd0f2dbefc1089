"""No import cycle between the package's modules, lazy imports included.

The layer contracts themselves (every import points down; the pure layers import
neither ucxx nor asyncio) are import-linter's, in pyproject.toml, run by ``./dev test``
(``lint-imports``). A layers contract says nothing about cycles inside one layer; this
test does. Every import counts, at module level or inside a function; only imports
under ``if TYPE_CHECKING:`` are left out. ``ucxrpc/__init__.py`` is the package's face.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "ucxrpc"


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            out[".".join(parts)] = path
    return out


def imports(module: str, path: Path) -> list[str]:
    """Every ucxrpc module and external top-level package ``module`` imports."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", "")
            if name == "TYPE_CHECKING":
                skip |= {n.lineno for b in node.body for n in ast.walk(b) if hasattr(n, "lineno")}
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                up = package[: len(package) - (node.level - 1)]
                base = ".".join(["ucxrpc", *up, *([node.module] if node.module else [])])
            out.append(base)
            out += [f"{base}.{a.name}" for a in node.names]
    return out


def internal(target: str, known: dict[str, Path]) -> str | None:
    if not target.startswith("ucxrpc."):
        return None
    name = target[len("ucxrpc.") :]
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def test_no_import_cycle() -> None:
    known = modules()
    graph = {
        m: {d for t in imports(m, p) if (d := internal(t, known)) and d != m and d != ""}
        for m, p in known.items()
        if m and p.name != "__init__.py"
    }
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if known[nxt].name == "__init__.py":
                continue
            if state.get(nxt) == 1:
                cycle.extend([*trail, node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*trail, node]):
                return True
        state[node] = 2
        return False

    for node in sorted(graph):
        if state.get(node) is None and visit(node, []):
            break
    assert not cycle, " -> ".join(cycle)
