"""Kept as an import path: the module lives in :mod:`ucxrpc.messaging.worker`."""

from .messaging.worker import *  # noqa: F403
from .messaging.worker import __all__ as __all__
