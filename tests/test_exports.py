"""The public surface: every public module declares __all__ and the package re-exports."""

from __future__ import annotations

import importlib

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
