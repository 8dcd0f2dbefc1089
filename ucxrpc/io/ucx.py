"""The one place that imports ucxx (its low-level Cython layer, not its asyncio layer)."""

from __future__ import annotations

import os

# UCX reads its environment once, when ucxx is first imported.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

from ucxx._lib import libucxx as lib
from ucxx._lib.arr import Array

__all__ = ["Array", "lib", "ucx_version"]


def ucx_version() -> str:
    """The UCX library version ucxx is linked against."""
    try:
        from ucxx._lib.libucxx import get_ucx_version

        return ".".join(str(x) for x in get_ucx_version())
    except ImportError:  # pragma: no cover - older ucxx
        return "unknown"
