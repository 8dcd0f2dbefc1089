"""Kept as an import path: the module lives in :mod:`ucxrpc.io.config`."""

from .io.config import *  # noqa: F403
from .io.config import __all__ as __all__
