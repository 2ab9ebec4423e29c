"""gRPC served over HTTP/2 from the event loop (h2), for the xDS port.

grpcio's asyncio server hands every streamed message between its poller thread and the event loop;
writing the HTTP/2 frames from the loop (h2) avoids those hops (figures: BENCHMARKS.md).
Servicers, generated stubs and handler objects stay grpcio's: this package only replaces the
server that runs them. ``xdsd serve --xds-transport grpcio`` keeps grpcio's server.
"""

from __future__ import annotations

from xdsd.transport.server import GrpcServer

__all__ = ["GrpcServer"]
