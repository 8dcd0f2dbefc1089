"""Kept as an import path: the module lives in :mod:`ucxrpc.wire.codec`."""

from .wire.codec import *  # noqa: F403
from .wire.codec import __all__ as __all__
