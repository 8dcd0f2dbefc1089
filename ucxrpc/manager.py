"""Kept as an import path: the module lives in :mod:`ucxrpc.calls.manager`."""

from .calls.manager import *  # noqa: F403
from .calls.manager import __all__ as __all__
