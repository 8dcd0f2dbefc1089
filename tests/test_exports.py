"""The public surface: every public module declares __all__ and the package re-exports."""

from __future__ import annotations

import importlib
from pathlib import Path

import ucxrpc

PUBLIC = [
    "codec",
    "errors",
    "manager",
    "server",
    "client",
    "transport",
    "config",
    "demo",
    "service",
    "stream",
    "context",
    "interceptors",
    "reflection",
    "liveness",
    "pool",
    "retry",
    "batch",
    "metrics",
]


def test_every_public_module_has_all() -> None:
    for name in PUBLIC:
        module = importlib.import_module(f"ucxrpc.{name}")
        assert isinstance(module.__all__, list), name
        for attr in module.__all__:
            assert hasattr(module, attr), f"ucxrpc.{name}.{attr}"


def test_package_exports_resolve() -> None:
    for name in ucxrpc.__all__:
        assert getattr(ucxrpc, name) is not None
    assert set(importlib.import_module("ucxrpc.errors").__all__) - {
        "error_from_status",
        "error_from_payload",
        "error_payload",
    } <= set(ucxrpc.__all__)


def test_every_example_is_run_by_a_test() -> None:
    root = Path(__file__).parent.parent
    tests = "".join(p.read_text() for p in (root / "tests").glob("test_*.py"))
    for example in sorted((root / "examples").glob("*.py")):
        assert f'"{example.name}"' in tests or f"examples/{example.name}" in tests, (
            f"no test runs examples/{example.name}"
        )
