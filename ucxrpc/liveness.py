"""Kept as an import path: the module lives in :mod:`ucxrpc.calls.liveness`."""

from .calls.liveness import *  # noqa: F403
from .calls.liveness import __all__ as __all__
