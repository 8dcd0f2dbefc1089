"""The sans-I/O protocol layer: the state of one connection, as data.

Nothing here imports ucxx or asyncio. :class:`Inbound` turns frames and data parts
arriving in any order into frames delivered in send order, each with exactly the
parts it announced; :class:`Outbound` numbers, stamps and tags what is sent, and
coalesces queued frames; :class:`CallIds` allocates ids that never collide with a
live call. The I/O layer (:mod:`ucxrpc.io.engine`, :mod:`ucxrpc.transport`) only moves
bytes and completions between UCX and these machines.
"""

from .ids import CallIds, random_id
from .inbound import (
    INBOX_LIMIT,
    Action,
    Budget,
    Deliver,
    Discard,
    Fail,
    Inbound,
    Receive,
    Shared,
    Violation,
)
from .outbound import Message, Outbound
from .priority import Priority

__all__ = [
    "INBOX_LIMIT",
    "Action",
    "Budget",
    "CallIds",
    "Deliver",
    "Discard",
    "Fail",
    "Inbound",
    "Message",
    "Outbound",
    "Priority",
    "Receive",
    "Shared",
    "Violation",
    "random_id",
]
