"""Keeping a connection alive: heartbeats that notice a silent peer, and reconnection.

The control connection already ends when the peer's process dies (the kernel closes
its sockets). A peer can also go silent without that: a host that vanished from the
network, a stopped process. :class:`KeepAlive` sends a heartbeat on the control
connection every ``interval`` seconds and declares the connection lost when no answer
comes within ``timeout``. :class:`Reconnect` then sets the connection up again, waiting
longer after each failed attempt.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["KeepAlive", "Reconnect"]


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """Heartbeats on the control connection.

    Attributes:
        interval: Seconds between heartbeats (the original design's 30 s).
        timeout: Seconds to wait for the answer before the connection is lost (5 s).
    """

    interval: float = 30.0
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0:
            raise ValueError("interval and timeout must be positive")


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Reconnection with growing delays after a lost connection.

    Attempt ``n`` (from 1) waits ``min(initial * multiplier ** (n - 1), maximum)``
    seconds, varied by up to ``jitter`` (a fraction) so that many clients do not
    reconnect in step.

    Attributes:
        initial: The first delay, in seconds.
        maximum: The longest delay.
        multiplier: Growth per attempt (1.0 for a constant delay).
        jitter: Random variation, as a fraction of the delay.
        attempts: Give up after this many failed attempts (None: keep trying until
            the client is closed).
    """

    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.1
    attempts: int | None = None

    def __post_init__(self) -> None:
        if self.initial < 0 or self.maximum < self.initial or self.multiplier < 1:
            raise ValueError("need 0 <= initial <= maximum and multiplier >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("attempts must be at least 1")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (1-based)."""
        base = self.initial
        if self.multiplier > 1 and self.initial > 0:
            # Past this many steps the delay is the maximum: never raise the multiplier
            # to a power that overflows a float (after ~1000 attempts).
            cap = math.log(self.maximum / self.initial) / math.log(self.multiplier)
            steps = attempt - 1
            base = self.maximum if steps >= cap else self.initial * self.multiplier**steps
        return base * (1 + random.uniform(-self.jitter, self.jitter))
