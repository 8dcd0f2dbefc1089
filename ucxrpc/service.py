"""Kept as an import path: the module lives in :mod:`ucxrpc.calls.service`."""

from .calls.service import *  # noqa: F403
from .calls.service import __all__ as __all__
