"""Kept as an import path: the module lives in :mod:`ucxrpc.calls.interceptors`."""

from .calls.interceptors import *  # noqa: F403
from .calls.interceptors import __all__ as __all__
