"""The RPC layer: servers, clients, streams, services, call context and interceptors.

Built on :mod:`ucxrpc.io`, :mod:`ucxrpc.protocol` and :mod:`ucxrpc.wire`; the public
names are re-exported from :mod:`ucxrpc`. (The package is not called ``rpc``: that name
is the public ``ucxrpc.rpc`` decorator.)
"""
