"""gRPC served over HTTP/2 from the event loop (h2), for the xDS port.

grpcio's asyncio server costs ~100 µs of CPU per streamed message (completion-queue hops between
its poller thread and the loop); writing HTTP/2 frames from the loop with h2 costs about half.
Servicers, generated stubs and handler objects stay grpcio's: this package only replaces the
server that runs them. ``xdsd serve --xds-transport grpcio`` keeps grpcio's server.
"""

from __future__ import annotations

from xdsd.transport.server import GrpcServer

__all__ = ["GrpcServer"]
