"""The messaging layer: the seeds' tagged messages (``Worker``) over the same links.

Its public path is :mod:`ucxrpc.transport`; the code lives in
:mod:`ucxrpc.messaging.worker`.
"""
