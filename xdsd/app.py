"""Wires sources -> controller -> cache -> servers for ``xdsd serve``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

import grpc
import prometheus_client
from aiohttp import web

from xdsd.admin.http import make_app
from xdsd.cache import SnapshotCache
from xdsd.controller import Controller
from xdsd.generators import generate
from xdsd.observability.metrics import Metrics
from xdsd.server.xds import XdsServer
from xdsd.sources.file import FileSource

log = logging.getLogger("xdsd")

GRPC_OPTIONS = [
    # Envoy's xDS client pings every 30 s (bootstrap); never punish it for that.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]


class App:
    def __init__(self, config: str, xds_address: tuple[str, int], admin_address: tuple[str, int], debounce: float) -> None:
        self.metrics = Metrics()
        self.cache = SnapshotCache(generate)
        self.server = XdsServer(self.cache, self.metrics)
        self.controller = Controller(FileSource(config, debounce=debounce), self.cache, self.metrics)
        self.xds_address = xds_address
        self.admin_address = admin_address
        self.serving = False
        self.stop = asyncio.Event()

    async def run(self) -> None:
        self.controller.reload()  # before any port opens: nothing is served before a valid config
        grpc_server = grpc.aio.server(options=GRPC_OPTIONS)
        grpc_server.add_generic_rpc_handlers(self.server.handlers())
        host, port = self.xds_address
        bound = grpc_server.add_insecure_port(f"{host}:{port}" if ":" not in host else f"[{host}]:{port}")
        if bound == 0:
            raise SystemExit(f"cannot listen on xDS address {host}:{port}")
        admin = web.AppRunner(make_app(self.server, self.controller, self.metrics, lambda: self.serving), access_log=None)
        await admin.setup()
        site = web.TCPSite(admin, self.admin_address[0], self.admin_address[1])
        await site.start()
        await grpc_server.start()
        self.serving = True
        log.info("xDS on %s:%d, admin on http://%s:%d", host, bound, *self.admin_address)
        watcher = asyncio.create_task(self.controller.run(self.stop))
        try:
            await self.stop.wait()
        finally:
            log.info("shutting down")
            self.serving = False
            watcher.cancel()
            await grpc_server.stop(grace=1.0)
            await admin.cleanup()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    prometheus_client.disable_created_metrics()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep serving without it
        runner = asyncio.run

    async def main() -> None:
        app = App(args.config, args.xds_address, args.admin_address, args.debounce)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, app.stop.set)
        await app.run()

    runner(main())
    return 0
