"""Call priorities, as they travel in a frame's header (0 to 255, higher first)."""

from __future__ import annotations

import enum

__all__ = ["Priority"]


class Priority(enum.IntEnum):
    """Call priority: when a limit is reached, higher priorities start first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
