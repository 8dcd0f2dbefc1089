"""Kept as an import path: the module lives in :mod:`ucxrpc.calls.stream`."""

from .calls.stream import *  # noqa: F403
from .calls.stream import __all__ as __all__
