"""Kept as an import path: the module lives in :mod:`ucxrpc.calls.server`."""

from .calls.server import *  # noqa: F403
from .calls.server import __all__ as __all__
