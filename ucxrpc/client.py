"""Kept as an import path: the module lives in :mod:`ucxrpc.calls.client`."""

from .calls.client import *  # noqa: F403
from .calls.client import __all__ as __all__
