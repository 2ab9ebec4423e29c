"""Wires sources -> controller -> cache -> servers for ``xdsd serve``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import ipaddress
import logging
import resource
import signal
import ssl
import time
from pathlib import Path

import grpc
import prometheus_client
from aiohttp import web
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.status.v3 import csds_pb2_grpc

from xdsd.admin.http import make_app
from xdsd.admin.site import KEEPALIVE_SECONDS, LimitedSite
from xdsd.api.v1 import registration_pb2_grpc
from xdsd.auth.access import Access
from xdsd.auth.methods import CallGate, grpc_gate
from xdsd.auth.node import node_authenticator
from xdsd.authz.http import AuthzHttpServer, start_http_authz
from xdsd.authz.servicer import AuthorizationServicer
from xdsd.ca import CertificateAuthority, IdentityStore
from xdsd.ca.serving import ServingFiles, ensure_serving_certificate, renew_at, serving_names
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
from xdsd.server.observer import FanOut, NackObserver
from xdsd.server.xds import XdsServer
from xdsd.sources.file import FileSource
from xdsd.sources.history import History
from xdsd.supervise import Supervisor
from xdsd.transport import GrpcServer
from xdsd.transport.server import server_tls

log = logging.getLogger("xdsd")

# A request message (a 10,000-cluster gateway's ACK is ~400 KB); parsing one is a loop stall.
MAX_RECEIVE_MESSAGE = 4 * 1024 * 1024
# How often the running server looks for new revocations and expired tokens.
TOKEN_CHECK_SECONDS = 0.5

GRPC_OPTIONS = [
    # Envoy's xDS client pings every 30 s (bootstrap); never punish it for that.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]


class ServingTls:
    """The TLS of xdsd's own ports (xDS and the authz HTTP port): the operator's certificate
    (``--xds-tls-cert``/``--xds-tls-key``), else one from xdsd's CA kept in the state directory and
    renewed before it expires. ``None`` contexts: ``--xds-plaintext``."""

    def __init__(self, args: argparse.Namespace, ca: CertificateAuthority) -> None:
        self.args = args
        self.ca = ca
        self.plaintext = bool(getattr(args, "xds_plaintext", False))
        self.operator = bool(args.xds_tls_cert or args.xds_tls_key)
        if self.operator and not (args.xds_tls_cert and args.xds_tls_key):
            raise SystemExit("xdsd: --xds-tls-cert and --xds-tls-key go together")
        if self.operator and self.plaintext:
            raise SystemExit("xdsd: --xds-plaintext and --xds-tls-cert exclude each other")
        self.files: ServingFiles | None = None
        self.cert: Path | None = None
        self.key: Path | None = None
        self._contexts: list[ssl.SSLContext] = []
        if self.plaintext:
            return
        if self.operator:
            self.cert, self.key = Path(args.xds_tls_cert), Path(args.xds_tls_key)
        else:
            self.ensure()

    def ensure(self) -> bool:
        """Issue or renew xdsd's own certificate if due; reload it into the live contexts."""
        if self.plaintext or self.operator:
            return False
        dns, ips = serving_names(self.args.xds_address[0], getattr(self.args, "xds_tls_san", []) or [])
        self.files, issued = ensure_serving_certificate(self.ca, self.args.state_dir, dns, ips)
        self.cert, self.key = self.files.cert, self.files.key
        if issued:
            for ctx in self._contexts:
                ctx.load_cert_chain(self.cert, self.key)  # new handshakes use it; live connections keep theirs
        return issued

    def grpc_context(self) -> ssl.SSLContext | None:
        if self.cert is None or self.key is None:
            return None
        ctx = server_tls(str(self.cert), str(self.key))
        self._contexts.append(ctx)
        return ctx

    def http_context(self) -> ssl.SSLContext | None:
        if self.cert is None or self.key is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        self._contexts.append(ctx)
        return ctx

    def grpcio_credentials(self) -> grpc.ServerCredentials | None:
        """grpcio's server: credentials that pick up a renewed certificate for new handshakes."""
        if self.cert is None or self.key is None:
            return None
        loaded: dict[str, object] = {}

        def config() -> grpc.ServerCertificateConfiguration | None:
            assert self.cert is not None and self.key is not None
            stamp = (self.cert.stat().st_mtime_ns, self.key.stat().st_mtime_ns)
            if loaded.get("stamp") == stamp:
                return None
            loaded["stamp"] = stamp
            return grpc.ssl_server_certificate_configuration([(self.key.read_bytes(), self.cert.read_bytes())])

        initial = config()
        assert initial is not None
        return grpc.dynamic_ssl_server_credentials(initial, config)

    async def renew_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.ensure()
            wait = 3600.0
            if self.files is not None:
                wait = max(1.0, min(wait, (renew_at(self.files) - dt.datetime.now(dt.UTC)).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)


class App:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.metrics = Metrics()
        self.stop = asyncio.Event()
        self.supervisor = Supervisor(self.stop, on_failure=lambda name: self.metrics.task_failures.labels(name).inc())
        state_dir: Path = args.state_dir
        if args.ca_cert or args.ca_key:
            if not (args.ca_cert and args.ca_key):
                raise SystemExit("xdsd: --ca-cert and --ca-key go together")
            ca = CertificateAuthority.from_files(args.ca_cert, args.ca_key, args.ca_bundle)
        else:
            ca = CertificateAuthority.load_or_create(state_dir, "mesh")
        self.tls = ServingTls(args, ca)
        self.identities = IdentityStore(ca, dt.timedelta(hours=1))
        self.cache = SnapshotCache(lambda mesh, group: generate(mesh, group, self.identities.credentials, self.cache.memo))
        required = args.auth == "required"
        if not required:
            log.warning("--auth off: every port answers every caller; use only for experiments")
        self.access = Access.from_state_dir(state_dir, required=required)
        # Control-plane spans over OTLP when an endpoint is configured (nothing is imported otherwise).
        self.tracing = make_tracing(endpoint_from(getattr(args, "otlp_endpoint", None)))
        # Staged rollouts hear of NACKs through the same seam as metrics and traces.
        rollouts = NackObserver(lambda *nack: self.controller.canary_nacked(*nack))
        observer = FanOut(self.metrics, self.tracing, rollouts) if self.tracing.enabled else FanOut(self.metrics, rollouts)
        self.metrics.role_of = lambda cluster: role_of(self.cache.mesh, cluster) if self.cache.mesh else UNKNOWN
        self.server = XdsServer(self.cache, observer, node_authenticator(self.access) if required else None,  # type: ignore[arg-type]
                                plaintext=self.tls.plaintext)
        self.authz = AuthorizationServicer(
            self.metrics.authz_decision, span=self.tracing.authz_span if self.tracing.enabled else None,  # type: ignore[union-attr]
            access=self.access)
        quota = getattr(args, "max_instances_per_service", 1000)
        self.registry = Registry(LocalStore(state_dir), drain_seconds=args.drain_time,
                                 max_per_service=quota, max_per_token=quota)
        self.controller = Controller(
            FileSource(args.config, debounce=args.debounce), self.cache, self.metrics, self.identities,
            on_mesh=self.authz.set_mesh, registry=self.registry,
            registry_debounce=getattr(args, "registry_debounce", 0.0), tracing=self.tracing,
            health=self.supervisor, max_removal=getattr(args, "max_removal", 50.0) / 100.0,
            settle=getattr(args, "settle", 5.0), history=History(state_dir, getattr(args, "history", 50)),
            fleet=self.server,
        )
        self.loop_monitor = LoopMonitor(self.metrics.loop_stall.observe)
        self.xds_address: tuple[str, int] = args.xds_address
        self.admin_address: tuple[str, int] = args.admin_address
        self.serving = False
        self.gate = grpc_gate(self.access, self.server.refused)

    def _register(self, server: grpc.aio.Server | GrpcServer) -> None:
        """Every gRPC service of the xDS port, on either transport."""
        self.server.register(server)
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(self.authz, server)
        csds_pb2_grpc.add_ClientStatusDiscoveryServiceServicer_to_server(ClientStatusServicer(self.server), server)
        registration_pb2_grpc.add_RegistrationServicer_to_server(RegistrationServicer(self.registry, self.access), server)

    async def _start_grpc(self) -> tuple[grpc.aio.Server | GrpcServer, int]:
        """The xDS port (not serving until ``start``): h2 on the loop, or grpcio's server."""
        host, port = self.xds_address
        if getattr(self.args, "xds_transport", "h2") == "grpcio":
            aio = grpc.aio.server(options=GRPC_OPTIONS, interceptors=[GateInterceptor(self.gate)])
            self._register(aio)
            target = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
            creds = self.tls.grpcio_credentials()
            bound = aio.add_secure_port(target, creds) if creds else aio.add_insecure_port(target)
            if bound == 0:
                raise SystemExit(f"cannot listen on xDS address {host}:{port}")
            return aio, bound
        h2 = GrpcServer(max_receive_message_length=MAX_RECEIVE_MESSAGE, authorize=self.gate,
                        max_connections=_connection_limit())
        self._register(h2)
        try:
            bound = await h2.listen(host, port, self.tls.grpc_context())
        except OSError as exc:
            raise SystemExit(f"cannot listen on xDS address {host}:{port}: {exc}") from exc
        return h2, bound

    async def _start_authz_http(self) -> AuthzHttpServer | None:
        """ext_authz over HTTP/1.1 (``--authz-http-address``), with the xDS port's TLS."""
        address = getattr(self.args, "authz_http_address", None)
        if address is None:
            return None
        try:
            server = await start_http_authz(self.authz, address[0], address[1], self.tls.http_context(),
                                            access=self.access if self.access.required else None)
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

    async def _enforce_tokens(self) -> None:
        """Keep up with `xdsd token revoke` / `rotate-key` / `retire-key` and with expiring tokens:
        the streams of a revoked or expired token end within a second."""
        while not self.stop.is_set():
            changed = self.access.refresh()
            if changed or time.time() >= self.server.next_expiry:
                ended = self.server.revalidate(self.access.still_valid)  # type: ignore[arg-type]
                if ended:
                    log.info("ended %d xDS streams whose token was revoked or expired", ended)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), TOKEN_CHECK_SECONDS)

    async def _watch(self) -> None:
        """The mesh file: catch up on any change missed while (re)starting, then follow edits."""
        self.controller.reload()
        await self.controller.run(self.stop)

    async def run(self) -> None:
        self.controller.reload()  # before any port opens: nothing is served before a valid config
        _tune_gc()
        grpc_server, bound = await self._start_grpc()
        host = self.xds_address[0]
        admin_app = make_app(self.server, self.controller, self.metrics, lambda: self.serving, self.loop_monitor,
                             access=self.access, debug_open=_is_loopback(self.admin_address[0]),
                             supervisor=self.supervisor)
        admin_app.add_routes(http_routes(self.registry, self.access))
        admin = web.AppRunner(admin_app, access_log=None, keepalive_timeout=KEEPALIVE_SECONDS)
        await admin.setup()
        site = LimitedSite(admin, self.admin_address[0], self.admin_address[1])
        try:
            await site.start()
        except OSError as exc:
            raise SystemExit(f"cannot listen on admin address {self.admin_address[0]}:{self.admin_address[1]}: {exc}") from exc
        authz_http = await self._start_authz_http()
        await grpc_server.start()
        self.serving = True
        log.info("xDS on %s:%d (%s), admin on http://%s:%d", host, bound,
                 "plaintext" if self.tls.plaintext else "TLS", *self.admin_address)
        sup = self.supervisor
        sup.start("file-watch", self._watch)
        sup.start("cert-rotation", self._rotate)
        sup.start("registry-sweep", self._sweep)
        sup.start("token-enforcement", self._enforce_tokens)
        sup.start("loop-monitor", lambda: self.loop_monitor.run(self.stop))
        if not self.tls.plaintext and not self.tls.operator:
            sup.start("tls-renewal", lambda: self.tls.renew_forever(self.stop))
        try:
            await self.stop.wait()
        finally:
            log.info("shutting down")
            self.serving = False
            await sup.close()
            await grpc_server.stop(grace=1.0)
            self.registry.flush()
            if authz_http is not None:
                await authz_http.close()
            await admin.cleanup()
            self.tracing.shutdown()  # write the last spans


class GateInterceptor(grpc.aio.ServerInterceptor):
    """The call-start token check (``auth.methods.grpc_gate``) for grpcio's server."""

    def __init__(self, gate: CallGate) -> None:
        self.gate = gate

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        refusal = self.gate(handler_call_details.method, tuple(handler_call_details.invocation_metadata or ()), "")
        if refusal is None:
            return await continuation(handler_call_details)
        code, details = refusal
        handler = await continuation(handler_call_details)
        if handler is None:
            return None

        async def deny(request_or_iterator, context):  # type: ignore[no-untyped-def]
            await context.abort(code, details)

        async def deny_stream(request_or_iterator, context):  # type: ignore[no-untyped-def]
            await context.abort(code, details)
            yield  # pragma: no cover - makes this an async generator

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny_stream)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _tune_gc() -> None:
    """Python's cyclic collector stops the world for as long as it takes to scan every tracked
    object; with thousands of streams a full collection held the loop 140 ms. What exists after
    start-up lives for the whole process: freeze it out of the scans, and collect the young
    generation less often (xdsd makes few reference cycles; refcounting frees the rest)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _connection_limit() -> int:
    """Connections the xDS port takes: what the open-files limit leaves after the other ports."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 16_384
    return max(256, min(16_384, soft - 4_096 - 1_024))


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


class SafeFormatter(logging.Formatter):
    """Log lines carry text from the network (node ids, NACK messages, paths): control characters
    other than newline and tab are written escaped, so a log viewer never interprets them."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if text.isprintable():
            return text
        return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def run_serve(args: argparse.Namespace) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=[handler])
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    # The HTTP/2 libraries log every header at debug level: tokens included. Never.
    for name in ("hpack", "h2", "hyperframe"):
        logging.getLogger(name).setLevel(logging.WARNING)
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
