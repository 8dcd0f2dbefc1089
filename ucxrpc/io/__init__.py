"""The I/O layer: the ucxx side.

The progress engine (:mod:`~ucxrpc.io.engine`), the links that join a connection's
protocol machines to a UCX endpoint (:mod:`~ucxrpc.io.link`), the handshake on the
control connection (:mod:`~ucxrpc.io.control`), and the runtime that owns the UCX
context and worker (:mod:`~ucxrpc.io.runtime`, with :mod:`~ucxrpc.io.config`).
"""
