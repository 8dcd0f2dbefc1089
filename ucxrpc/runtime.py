"""Kept as an import path: the module lives in :mod:`ucxrpc.io.runtime`."""

from .io.runtime import *  # noqa: F403
from .io.runtime import __all__ as __all__
