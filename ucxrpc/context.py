"""Kept as an import path: the module lives in :mod:`ucxrpc.calls.context`."""

from .calls.context import *  # noqa: F403
from .calls.context import __all__ as __all__
