"""Kept as an import path: the module lives in :mod:`ucxrpc.calls.reflection`."""

from .calls.reflection import *  # noqa: F403
from .calls.reflection import __all__ as __all__
