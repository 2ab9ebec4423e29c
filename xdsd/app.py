"""``xdsd serve``: wires sources -> controller -> cache -> servers, and runs them in named stages:
``startup`` (load the config before any port opens, open the ports, start the background tasks),
``run`` (until stopped), ``shutdown`` (stop taking work, let calls end, flush, close)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import ipaddress
import logging
import resource
import signal

import grpc
import prometheus_client
from aiohttp import web
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.status.v3 import csds_pb2_grpc

from xdsd.admin.http import make_app
from xdsd.admin.site import KEEPALIVE_SECONDS, LimitedSite
from xdsd.api.v1 import registration_pb2_grpc
from xdsd.auth.access import Access
from xdsd.auth.methods import GateInterceptor, grpc_gate
from xdsd.auth.node import node_authenticator
from xdsd.authz.http import AuthzHttpServer, start_http_authz
from xdsd.authz.servicer import AuthorizationServicer
from xdsd.ca import CertificateAuthority, IdentityStore
from xdsd.cache import SnapshotCache
from xdsd.controller import Controller
from xdsd.extproc.runner import make_runner
from xdsd.extproc.servicer import ProcessingServicer
from xdsd.generators import MeshGenerator
from xdsd.generators.roles import UNKNOWN, role_of
from xdsd.model import Mesh
from xdsd.model.authentication import protect_secret_files
from xdsd.observability.loop import LoopMonitor
from xdsd.observability.metrics import Metrics
from xdsd.observability.processing import ProcessingMetrics
from xdsd.observability.tracing import endpoint_from, make_tracing
from xdsd.registry.api import RegistrationServicer, http_routes
from xdsd.registry.ops import LocalRegistrations
from xdsd.registry.registry import Registry
from xdsd.registry.store import LocalStore, MemoryStore
from xdsd.server.csds import ClientStatusServicer
from xdsd.server.observer import FanOut, NackObserver
from xdsd.server.xds import XdsServer
from xdsd.serving_tls import ServingTls
from xdsd.settings import ServeSettings
from xdsd.shared import Shared
from xdsd.sources.file import FileSource
from xdsd.sources.history import History
from xdsd.supervise import Supervisor
from xdsd.transport import GrpcServer

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


class App:
    def __init__(self, settings: ServeSettings, shared: Shared | None = None, stop: asyncio.Event | None = None) -> None:
        self.settings = s = settings
        protect_secret_files(s.own_secret_files())  # before any mesh is loaded
        self.shared = shared  # --store etcd://: this process is one replica of several
        self.stop = stop or asyncio.Event()
        self.serving = False
        self.metrics = Metrics(role_of=lambda cluster: role_of(mesh, cluster) if (mesh := self.controller.file_mesh) else UNKNOWN)
        self.supervisor = Supervisor(self.stop, on_failure=lambda name: self.metrics.task_failures.labels(name).inc())
        if s.ca_cert or s.ca_key:
            if not (s.ca_cert and s.ca_key):
                raise SystemExit("xdsd: --ca-cert and --ca-key go together")
            ca = CertificateAuthority.from_files(s.ca_cert, s.ca_key, s.ca_bundle)
        else:
            ca = CertificateAuthority.load_or_create(s.state_dir, "mesh")
        self.tls = ServingTls(s, ca)
        self.identities = IdentityStore(ca, dt.timedelta(hours=1), aligned=shared is not None)
        self.cache = SnapshotCache(MeshGenerator(lambda: self.identities.credentials))
        if not s.auth_required:
            log.warning("--auth off: every port answers every caller; use only for experiments")
        self.access = Access.from_state_dir(s.state_dir, required=s.auth_required)
        # Control-plane spans over OTLP when an endpoint is configured (nothing is imported otherwise).
        self.tracing = make_tracing(endpoint_from(s.otlp_endpoint))
        # Staged rollouts hear of NACKs through the same seam as metrics and traces.
        rollouts = NackObserver(lambda *nack: self.controller.canary_nacked(*nack))
        observer = FanOut(self.metrics, self.tracing, rollouts) if self.tracing.enabled else FanOut(self.metrics, rollouts)
        self.server = XdsServer(self.cache, observer, node_authenticator(self.access) if s.auth_required else None,  # type: ignore[arg-type]
                                plaintext=self.tls.plaintext)
        self.authz = AuthorizationServicer(
            self.metrics.authz_decision, span=self.tracing.authz_span if self.tracing.enabled else None,  # type: ignore[union-attr]
            access=self.access)
        # ext_proc: the mesh's Python processors, in worker threads or processes (xdsd/extproc).
        self.processing = ProcessingServicer(
            make_runner(s.processor_pool), observer=ProcessingMetrics(self.metrics.registry).observe, access=self.access,
            span=self.tracing.processing_span if self.tracing.enabled else None)  # type: ignore[union-attr]
        self.registry = Registry(MemoryStore() if shared else LocalStore(s.state_dir), drain_seconds=s.drain_time,
                                 max_per_service=s.max_instances_per_service, max_per_token=s.max_instances_per_service,
                                 expire_locally=shared is None)
        mesh_file = shared.mesh_path if shared is not None else s.config
        assert mesh_file is not None
        self.controller = Controller(
            FileSource(mesh_file, debounce=s.debounce), self.cache, self.metrics, self.identities,
            on_mesh=self._on_mesh, registry=self.registry, registry_debounce=s.registry_debounce,
            tracing=self.tracing, health=self.supervisor, max_removal=s.max_removal, settle=s.settle,
            history=History(s.state_dir, s.history), fleet=self.server,
        )
        if shared is not None:
            shared.attach(self.registry, self.controller, self.server)
        self.registrations = shared.ops if shared is not None and shared.ops is not None else LocalRegistrations(self.registry)
        self.loop_monitor = LoopMonitor(self.metrics.loop_stall.observe)
        self.gate = grpc_gate(self.access, self.server.refused)
        self._grpc: grpc.aio.Server | GrpcServer | None = None
        self._admin: web.AppRunner | None = None
        self._authz_http: AuthzHttpServer | None = None

    def _on_mesh(self, mesh: Mesh) -> None:
        """The extension services follow the mesh revision that drives xDS."""
        self.authz.set_mesh(mesh)
        rollout = self.controller.rollout  # canaries run the candidate's processing steps meanwhile
        self.processing.set_mesh(mesh, *([rollout.candidate] if rollout is not None and rollout.active else []))

    # -- the ports -----------------------------------------------------------------------------

    def _register(self, server: grpc.aio.Server | GrpcServer) -> None:
        """Every gRPC service of the xDS port, on either transport."""
        self.server.register(server)
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(self.authz, server)
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(self.processing, server)
        csds_pb2_grpc.add_ClientStatusDiscoveryServiceServicer_to_server(ClientStatusServicer(self.server), server)
        registration_pb2_grpc.add_RegistrationServicer_to_server(RegistrationServicer(self.registry, self.access,
                                                                                                 self.registrations), server)

    async def _start_grpc(self) -> tuple[grpc.aio.Server | GrpcServer, int]:
        """The xDS port (not serving until ``start``): h2 on the loop, or grpcio's server."""
        host, port = self.settings.xds_address
        if self.settings.xds_transport == "grpcio":
            aio = grpc.aio.server(options=GRPC_OPTIONS, interceptors=[GateInterceptor(self.gate)])
            self._register(aio)
            target = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
            creds = self.tls.grpcio_credentials()
            bound = aio.add_secure_port(target, creds) if creds else aio.add_insecure_port(target)
            if bound == 0:
                raise SystemExit(f"cannot listen on xDS address {host}:{port}")
            return aio, bound
        h2 = GrpcServer(max_receive_message_length=MAX_RECEIVE_MESSAGE, authorize=self.gate,
                        max_connections=_connection_limit(),
                        max_unauthenticated_per_source=self.settings.max_unauthenticated_per_source)
        self._register(h2)
        try:
            bound = await h2.listen(host, port, self.tls.grpc_context())
        except OSError as exc:
            raise SystemExit(f"cannot listen on xDS address {host}:{port}: {exc}") from exc
        return h2, bound

    async def _start_admin(self) -> None:
        host, port = self.settings.admin_address
        app = make_app(self.server, self.controller, self.metrics, lambda: self.serving, self.loop_monitor,
                       access=self.access, debug_open=_is_loopback(host), supervisor=self.supervisor,
                       shared=self.shared)
        app.add_routes(http_routes(self.registry, self.access, self.registrations))
        self._admin = web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_SECONDS)
        await self._admin.setup()
        try:
            await LimitedSite(self._admin, host, port).start()
        except OSError as exc:
            raise SystemExit(f"cannot listen on admin address {host}:{port}: {exc}") from exc

    async def _start_authz_http(self) -> None:
        """ext_authz over HTTP/1.1 (``--authz-http-address``), with the xDS port's TLS."""
        address = self.settings.authz_http_address
        if address is None:
            return
        try:
            self._authz_http = await start_http_authz(self.authz, address[0], address[1], self.tls.http_context(),
                                                      access=self.access if self.access.required else None)
        except OSError as exc:
            raise SystemExit(f"cannot listen on authz HTTP address {address[0]}:{address[1]}: {exc}") from exc
        log.info("ext_authz over HTTP on %s:%d", *address)

    # -- background work -------------------------------------------------------------------------

    async def _watch(self) -> None:
        """The mesh file: catch up on any change missed while (re)starting, then follow edits."""
        self.controller.reload()
        await self.controller.run(self.stop)

    def _start_tasks(self) -> None:
        sup, stop = self.supervisor, self.stop
        if self.shared is not None and self.shared.sync is not None and self.shared.announcer is not None:
            sup.start("etcd-watch", lambda: self.shared.sync.follow(stop))  # type: ignore[union-attr]
            sup.start("replica-announce", lambda: self.shared.announcer.run(stop))  # type: ignore[union-attr]
        else:
            sup.start("file-watch", self._watch)
        sup.start("cert-rotation", lambda: self.identities.rotate_forever(stop, self.controller.refresh))
        sup.start("registry-sweep", lambda: self.registry.sweep_forever(stop))
        sup.start("token-enforcement", lambda: self.server.enforce_tokens(
            self.access.refresh, self.access.still_valid, stop, TOKEN_CHECK_SECONDS))  # type: ignore[arg-type]
        sup.start("loop-monitor", lambda: self.loop_monitor.run(stop))
        if not self.tls.plaintext and not self.tls.operator:
            sup.start("tls-renewal", lambda: self.tls.renew_forever(stop))

    # -- stages ----------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Load the config before any port opens (nothing is served before a valid config), open the
        ports, start the background work. With etcd: the admin port first (not ready), then etcd's
        state, then the xDS port."""
        if self.shared is not None:
            await self._start_admin()
            if not await self.shared.first_load(self.stop):
                return
        else:
            self.controller.reload()
        await self.processing.ready()  # ext_proc worker processes, when the mesh has processing steps
        _tune_gc()
        self._grpc, bound = await self._start_grpc()
        if self.shared is None:
            await self._start_admin()
        await self._start_authz_http()
        await self._grpc.start()
        self.serving = True
        log.info("xDS on %s:%d (%s), admin on http://%s:%d", self.settings.xds_address[0], bound,
                 "plaintext" if self.tls.plaintext else "TLS", *self.settings.admin_address)
        self._start_tasks()

    async def shutdown(self) -> None:
        """Stop taking work, let open calls end (1 s), write what is pending, close everything."""
        log.info("shutting down")
        self.serving = False
        await self.supervisor.close()
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        self.registry.flush()
        self.processing.close()
        if self._authz_http is not None:
            await self._authz_http.close()
        if self._admin is not None:
            await self._admin.cleanup()
        if self.shared is not None:
            await self.shared.close()
        self.tracing.shutdown()  # write the last spans

    async def run(self) -> None:
        try:
            await self.startup()
            await self.stop.wait()
        finally:
            await self.shutdown()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _tune_gc() -> None:
    """Python's cyclic collector stops the world for as long as it takes to scan every tracked
    object, and thousands of streams are many objects. What exists after start-up lives for the
    whole process: freeze it out of the scans, and collect the young generation less often (xdsd
    makes few reference cycles; refcounting frees the rest)."""
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
    logging.getLogger("grpc").setLevel(logging.WARNING)  # the etcd client's channel: noisy at debug
    for name in ("hpack", "h2", "hyperframe"):
        logging.getLogger(name).setLevel(logging.WARNING)
    prometheus_client.disable_created_metrics()
    _raise_fd_limit()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep serving without it
        runner = asyncio.run

    settings = ServeSettings.from_args(args)
    protect_secret_files(settings.own_secret_files())

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        shared = None
        if settings.store.etcd:
            shared = Shared(settings)
            log.info("store: %s; replica %s", settings.store.describe(), shared.id)
            if not await shared.fetch_secrets(stop):
                await shared.close()
                return
        app = App(settings, shared, stop)
        await app.run()

    runner(main())
    return 0
