"""The wire layer: msgpack framing, the tag layout, the batch container and the limits.

Pure: it imports msgpack, the standard library and :mod:`ucxrpc.errors` only, so every
frame can be built and parsed on bytes alone. See :mod:`ucxrpc.wire.codec`.
"""
