"""The package's layers: every import points down, no cycle, pure layers stay pure.

Every import counts, at module level or inside a function (a lazy import ties two
modules together as much as any); only imports under ``if TYPE_CHECKING:`` are left
out. ``ucxrpc/__init__.py`` is the package's face and re-exports from every layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "ucxrpc"

# Lower numbers are lower layers (SPEC §1). Modules of one layer may import each other
# (without a cycle); messaging and rpc sit side by side and may not import each other.
LAYERS: dict[str, tuple[int, str]] = {
    "errors": (0, "errors"),
    "wire": (1, "wire"),
    "protocol": (2, "protocol"),
    "io": (3, "io"),
    "calls": (4, "rpc"),
    "messaging": (4, "messaging"),
    "pool": (5, "extras"),
    "retry": (5, "extras"),
    "batch": (5, "extras"),
    "metrics": (5, "extras"),
    "demo": (5, "extras"),
    # Old import paths kept for users: each re-exports one module of a layer.
    **{
        face: (6, "faces")
        for face in (
            "codec",
            "config",
            "runtime",
            "manager",
            "server",
            "client",
            "stream",
            "service",
            "context",
            "interceptors",
            "reflection",
            "liveness",
            "transport",
        )
    },
    "cli": (7, "cli"),
}
PURE = {"errors", "wire", "protocol"}
FORBIDDEN_IN_PURE = ("ucxx", "asyncio", "uvloop")


def layer_of(module: str) -> tuple[int, str]:
    """The layer of a module path relative to the package (``protocol.inbound`` ...)."""
    top = module.split(".")[0]
    if top.startswith("_cli"):
        top = "cli"
    if top not in LAYERS:
        pytest.fail(f"ucxrpc.{module} is in no layer: add it to LAYERS")
    return LAYERS[top]


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


def test_every_import_points_down_and_pure_layers_stay_pure() -> None:
    known = modules()
    problems = []
    for module, path in sorted(known.items()):
        if module == "":
            continue
        rank, layer = layer_of(module)
        for target in imports(module, path):
            if layer in PURE and target.split(".")[0] in FORBIDDEN_IN_PURE:
                problems.append(f"{module} ({layer}) imports {target}")
            dep = internal(target, known)
            if dep is None or dep == module or dep.split(".")[0] == module.split(".")[0]:
                continue
            dep_rank, dep_layer = layer_of(dep)
            if dep_rank > rank or (dep_rank == rank and dep_layer != layer):
                problems.append(f"{module} ({layer}) imports {dep} ({dep_layer})")
    assert not problems, "\n".join(sorted(set(problems)))


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
