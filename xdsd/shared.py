"""``xdsd serve --store etcd://...``: the parts that make this process one replica of several.

Before the App exists: the CA root and token key are fetched from etcd (created there by the first
replica) into the state directory. At startup: the admin port opens (``/readyz`` says not ready),
the prefix is listed until etcd answers (a replica that cannot reach etcd serves nothing rather
than an empty mesh), an empty store is seeded from ``--config``, and only then does the xDS port
open. While running: the prefix is watched (registrations, mesh, revocations, replicas), this
replica is announced on a lease, and writes (register, heartbeat, apply) go to etcd first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from xdsd.controller import Controller
from xdsd.errors import MeshError, StoreUnavailable
from xdsd.registry.registry import Registry
from xdsd.server.xds import XdsServer
from xdsd.settings import ServeSettings
from xdsd.store.etcd import EtcdClient
from xdsd.store.keys import Keys
from xdsd.store.mesh import EtcdMesh
from xdsd.store.registrations import EtcdRegistrations
from xdsd.store.replica import ReplicaAnnouncer, replica_id
from xdsd.store.secrets import sync_secrets
from xdsd.store.sync import EtcdSync

log = logging.getLogger(__name__)

RETRY_MIN, RETRY_MAX = 0.2, 2.0


async def _retry(what: str, stop: asyncio.Event, attempt: Callable[[], Awaitable[object]]) -> bool:
    """Run ``attempt()`` until it succeeds (True) or ``stop`` is set (False), backing off while
    etcd is unavailable and saying so once."""
    delay, said = RETRY_MIN, None
    while not stop.is_set():
        try:
            await attempt()
            if said is not None:
                log.info("%s: etcd answers again", what)
            return True
        except StoreUnavailable as exc:
            if said != str(exc):
                log.warning("%s: %s; not ready, retrying", what, exc)
                said = str(exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(RETRY_MAX, delay * 2)
    return False


class Shared:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.client = EtcdClient(settings.store)
        self.keys = Keys(settings.store.prefix)
        self.id = replica_id(settings.xds_address)
        self.sync: EtcdSync | None = None
        self.ops: EtcdRegistrations | None = None
        self.mesh: EtcdMesh | None = None
        self.announcer: ReplicaAnnouncer | None = None
        self.controller: Controller | None = None

    @property
    def mesh_path(self) -> Path:
        """Where the controller keeps the mesh etcd holds (a cache; never the --config seed)."""
        return self.settings.state_dir / "etcd" / "mesh.yaml"

    async def fetch_secrets(self, stop: asyncio.Event) -> bool:
        self.mesh_path.parent.mkdir(parents=True, exist_ok=True)
        self.mesh_path.unlink(missing_ok=True)  # never serve what an earlier run left
        return await _retry("fetching the CA and token key", stop, lambda: sync_secrets(
            self.client, self.keys, self.settings.state_dir, create=True))

    def attach(self, registry: Registry, controller: Controller, server: XdsServer) -> None:
        self.controller = controller
        self.sync = EtcdSync(self.client, self.keys, registry, self.settings.state_dir, self._mesh_changed)
        self.ops = EtcdRegistrations(registry, self.client, self.keys, self.sync)
        self.mesh = EtcdMesh(self.client, self.keys, self.sync, self.settings.history)
        s = self.settings
        info: dict[str, object] = {"xds_address": f"{s.xds_address[0]}:{s.xds_address[1]}",
                                   "admin_address": f"{s.admin_address[0]}:{s.admin_address[1]}"}
        self.announcer = ReplicaAnnouncer(self.client, self.keys, self.id, info,
                                          lambda: [n for nodes in server.clusters().values() for n in nodes])

    def _mesh_changed(self, content: bytes, revision: int) -> None:
        assert self.controller is not None
        out = self.controller.apply_content(content, "etcd", allow_removal=True)
        if out.get("result") == "rejected":
            log.error("the mesh in etcd (revision %d) is not served here: %s", revision, out.get("errors"))
        else:
            log.info("mesh from etcd revision %d: %s", revision, out.get("result"))

    async def first_load(self, stop: asyncio.Event) -> bool:
        """List etcd (retrying while it is unavailable); seed an empty store from --config."""
        assert self.sync is not None and self.mesh is not None
        if not await _retry("listing etcd", stop, self.sync.load):
            return False
        if self.sync.mesh is None:
            config = self.settings.config
            if config is None:
                log.error("etcd holds no mesh under %s and no --config was given to seed it: serving nothing "
                          "until a mesh is applied", self.keys.prefix)
                return True
            try:
                content = await asyncio.to_thread(Path(config).read_bytes)
            except OSError as exc:
                raise SystemExit(f"xdsd: cannot read --config {config}: {exc}") from None
            try:
                await _retry("seeding the mesh", stop, lambda: self.mesh.seed(content, str(config)))  # type: ignore[union-attr]
            except MeshError as exc:
                raise SystemExit(f"xdsd: --config {config} is not a valid mesh: "
                                 + "; ".join(str(e) for e in exc.errors)) from None
            await _retry("listing etcd", stop, self.sync.load)
        return True

    # -- admin.http.SharedMesh -----------------------------------------------------------------

    @property
    def base(self) -> int:
        return self.mesh.base if self.mesh is not None else 0

    async def apply(self, content: bytes, how: str, allow_removal: bool, base: int | None) -> tuple[int, dict[str, object]]:
        assert self.mesh is not None and self.controller is not None
        controller = self.controller
        return await self.mesh.apply(content, how, allow_removal, base, controller.precheck,
                                     lambda c, h: controller.apply_content(c, h, allow_removal=True))

    async def history(self) -> list[dict[str, object]]:
        assert self.mesh is not None
        return await self.mesh.history()

    def replicas(self) -> dict[str, object]:
        assert self.sync is not None
        listed = [{**info, "self": rid == self.id} for rid, info in sorted(self.sync.replicas.items())]
        return {"store": self.settings.store.describe(), "self": self.id, "sync": self.sync.status(), "replicas": listed}

    # -- lifecycle -------------------------------------------------------------------------------

    async def close(self) -> None:
        if self.announcer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.announcer.withdraw(), 2.0)
        await self.client.close()
