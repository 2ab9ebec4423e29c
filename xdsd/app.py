"""Wires sources -> controller -> cache -> servers for ``xdsd serve``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import logging
import resource
import signal
import ssl
from pathlib import Path

import grpc
import prometheus_client
from aiohttp import web
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.status.v3 import csds_pb2_grpc

from xdsd.admin.http import make_app
from xdsd.api.v1 import registration_pb2_grpc
from xdsd.auth.node import registration_authenticator, token_authenticator
from xdsd.auth.tokens import TokenSigner
from xdsd.authz.http import AuthzHttpServer, start_http_authz
from xdsd.authz.servicer import AuthorizationServicer
from xdsd.ca import CertificateAuthority, IdentityStore
from xdsd.cache import SnapshotCache
from xdsd.controller import Controller
from xdsd.generators import generate
from xdsd.generators.roles import UNKNOWN, role_of
from xdsd.observability.loop import LoopMonitor
from xdsd.observability.metrics import Metrics
from xdsd.observability.tracing import endpoint_from, make_tracing
from xdsd.registry.api import RegistrationServicer, http_routes
from xdsd.registry.registry import Registry
from xdsd.registry.store import LocalStore
from xdsd.server.csds import ClientStatusServicer
from xdsd.server.observer import FanOut
from xdsd.server.xds import XdsServer
from xdsd.sources.file import FileSource
from xdsd.transport import GrpcServer
from xdsd.transport.server import server_tls

log = logging.getLogger("xdsd")

MAX_RECEIVE_MESSAGE = 16 * 1024 * 1024

GRPC_OPTIONS = [
    # Envoy's xDS client pings every 30 s (bootstrap); never punish it for that.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]


class App:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.metrics = Metrics()
        state_dir: Path = args.state_dir
        if args.ca_cert or args.ca_key:
            if not (args.ca_cert and args.ca_key):
                raise SystemExit("xdsd: --ca-cert and --ca-key go together")
            ca = CertificateAuthority.from_files(args.ca_cert, args.ca_key, args.ca_bundle)
        else:
            ca = CertificateAuthority.load_or_create(state_dir, "mesh")
        self.identities = IdentityStore(ca, dt.timedelta(hours=1))
        self.cache = SnapshotCache(lambda mesh, group: generate(mesh, group, self.identities.credentials, self.cache.memo))
        authenticator = None
        if args.auth == "required":
            authenticator = token_authenticator(TokenSigner.load_or_create(state_dir))
        # Control-plane spans over OTLP when an endpoint is configured (nothing is imported otherwise).
        self.tracing = make_tracing(endpoint_from(getattr(args, "otlp_endpoint", None)))
        observer = FanOut(self.metrics, self.tracing) if self.tracing.enabled else self.metrics
        self.metrics.role_of = lambda cluster: role_of(self.cache.mesh, cluster) if self.cache.mesh else UNKNOWN
        self.server = XdsServer(self.cache, observer, authenticator)  # type: ignore[arg-type]
        self.authz = AuthorizationServicer(
            self.metrics.authz_decision, span=self.tracing.authz_span if self.tracing.enabled else None)  # type: ignore[union-attr]
        self.registry = Registry(LocalStore(state_dir), drain_seconds=args.drain_time)
        self.registration_auth = None
        if args.auth == "required":
            self.registration_auth = registration_authenticator(TokenSigner.load_or_create(state_dir))
        self.controller = Controller(
            FileSource(args.config, debounce=args.debounce), self.cache, self.metrics, self.identities,
            on_mesh=self.authz.set_mesh, registry=self.registry,
            registry_debounce=getattr(args, "registry_debounce", 0.0), tracing=self.tracing,
        )
        self.loop_monitor = LoopMonitor(self.metrics.loop_stall.observe)
        self.xds_address: tuple[str, int] = args.xds_address
        self.admin_address: tuple[str, int] = args.admin_address
        self.serving = False
        self.stop = asyncio.Event()

    def _tls_files(self) -> tuple[Path, Path] | None:
        if not (self.args.xds_tls_cert or self.args.xds_tls_key):
            return None
        if not (self.args.xds_tls_cert and self.args.xds_tls_key):
            raise SystemExit("xdsd: --xds-tls-cert and --xds-tls-key go together")
        return self.args.xds_tls_cert, self.args.xds_tls_key

    def _register(self, server: grpc.aio.Server | GrpcServer) -> None:
        """Every gRPC service of the xDS port, on either transport."""
        server.add_generic_rpc_handlers(self.server.handlers())
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(self.authz, server)
        csds_pb2_grpc.add_ClientStatusDiscoveryServiceServicer_to_server(ClientStatusServicer(self.server), server)
        registration_pb2_grpc.add_RegistrationServicer_to_server(
            RegistrationServicer(self.registry, self.registration_auth), server
        )

    async def _start_grpc(self) -> tuple[grpc.aio.Server | GrpcServer, int]:
        """The xDS port (not serving until ``start``): h2 on the loop, or grpcio's server."""
        host, port = self.xds_address
        tls = self._tls_files()
        if getattr(self.args, "xds_transport", "h2") == "grpcio":
            aio = grpc.aio.server(options=GRPC_OPTIONS)
            self._register(aio)
            target = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
            creds = grpc.ssl_server_credentials([(tls[1].read_bytes(), tls[0].read_bytes())]) if tls else None
            bound = aio.add_secure_port(target, creds) if creds else aio.add_insecure_port(target)
            if bound == 0:
                raise SystemExit(f"cannot listen on xDS address {host}:{port}")
            return aio, bound
        h2 = GrpcServer(max_receive_message_length=MAX_RECEIVE_MESSAGE)
        self._register(h2)
        try:
            bound = await h2.listen(host, port, server_tls(str(tls[0]), str(tls[1])) if tls else None)
        except OSError as exc:
            raise SystemExit(f"cannot listen on xDS address {host}:{port}: {exc}") from exc
        return h2, bound

    async def _start_authz_http(self) -> AuthzHttpServer | None:
        """ext_authz over HTTP/1.1 (``--authz-http-address``), with xDS's TLS certificate if it has one."""
        address = getattr(self.args, "authz_http_address", None)
        if address is None:
            return None
        tls = None
        if self.args.xds_tls_cert and self.args.xds_tls_key:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self.args.xds_tls_cert, self.args.xds_tls_key)
        try:
            server = await start_http_authz(self.authz, address[0], address[1], tls)
        except OSError as exc:
            raise SystemExit(f"cannot listen on authz HTTP address {address[0]}:{address[1]}: {exc}") from exc
        log.info("ext_authz over HTTP on %s:%d", *address)
        return server

    async def _sweep(self) -> None:
        """Expire registrations whose heartbeats lapsed (within a fraction of a second of the TTL)."""
        while not self.stop.is_set():
            self.registry.sweep()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.1)

    async def _rotate(self) -> None:
        """Reissue each SVID at half its life and push the new secrets."""
        while not self.stop.is_set():
            due = self.identities.next_rotation()
            wait = 1.0 if due is None else (due - dt.datetime.now(dt.UTC)).total_seconds()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), min(wait, 5.0))
                continue
            rotated = self.identities.rotate_due()
            if rotated:
                log.debug("rotated %d SVIDs", len(rotated))
                self.controller.refresh()

    async def run(self) -> None:
        self.controller.reload()  # before any port opens: nothing is served before a valid config
        _tune_gc()
        grpc_server, bound = await self._start_grpc()
        host = self.xds_address[0]
        admin_app = make_app(self.server, self.controller, self.metrics, lambda: self.serving, self.loop_monitor)
        admin_app.add_routes(http_routes(self.registry, self.registration_auth))
        admin = web.AppRunner(admin_app, access_log=None)
        await admin.setup()
        site = web.TCPSite(admin, self.admin_address[0], self.admin_address[1])
        await site.start()
        authz_http = await self._start_authz_http()
        await grpc_server.start()
        self.serving = True
        log.info("xDS on %s:%d, admin on http://%s:%d", host, bound, *self.admin_address)
        watcher = asyncio.create_task(self.controller.run(self.stop))
        rotator = asyncio.create_task(self._rotate())
        sweeper = asyncio.create_task(self._sweep())
        monitor = asyncio.create_task(self.loop_monitor.run(self.stop))
        try:
            await self.stop.wait()
        finally:
            log.info("shutting down")
            self.serving = False
            watcher.cancel()
            rotator.cancel()
            sweeper.cancel()
            monitor.cancel()
            await grpc_server.stop(grace=1.0)
            self.registry.flush()
            if authz_http is not None:
                await authz_http.close()
            await admin.cleanup()
            for task in (watcher, rotator, sweeper, monitor):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self.tracing.shutdown()  # write the last spans


def _tune_gc() -> None:
    """Python's cyclic collector stops the world for as long as it takes to scan every tracked
    object; with thousands of streams a full collection held the loop 140 ms. What exists after
    start-up lives for the whole process: freeze it out of the scans, and collect the young
    generation less often (xdsd makes few reference cycles; refcounting frees the rest)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _raise_fd_limit() -> None:
    """Every proxy holds a connection: a control plane for thousands needs more than the usual
    1,024 open files. Lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # pragma: no cover - depends on the host
            log.warning("open-files limit stays at %d (%s): at most that many proxies can connect", soft, exc)


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    prometheus_client.disable_created_metrics()
    _raise_fd_limit()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep serving without it
        runner = asyncio.run

    async def main() -> None:
        app = App(args)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, app.stop.set)
        await app.run()

    runner(main())
    return 0
