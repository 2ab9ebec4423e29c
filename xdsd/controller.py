"""Feeds validated mesh revisions from the sources into the cache; keeps the last good one when a
revision is rejected, and remembers why it was."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from xdsd.ca import IdentityStore
from xdsd.cache import InconsistentSnapshot, SnapshotCache
from xdsd.errors import FieldError, MeshError
from xdsd.generators import required_identities
from xdsd.model import Mesh
from xdsd.observability.metrics import Metrics
from xdsd.observability.tracing import NO_TRACING, NULL_REVISION, AnyRevisionTrace, AnyTracing
from xdsd.registry.merge import Merger, mesh_check
from xdsd.registry.registry import Registry
from xdsd.sources.file import FileSource

log = logging.getLogger(__name__)


@dataclass
class ConfigStatus:
    source: str
    revision: int = 0
    loaded_at: float | None = None
    summary: str = ""
    last_error: list[str] = field(default_factory=list)
    last_error_at: float | None = None
    rejections: int = 0

    def as_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "revision": self.revision,
            "loaded_at": self.loaded_at,
            "summary": self.summary,
            "valid": not self.last_error,
            "last_error": self.last_error or None,
            "last_error_at": self.last_error_at,
            "rejections": self.rejections,
        }


class Controller:
    def __init__(
        self,
        source: FileSource,
        cache: SnapshotCache,
        metrics: Metrics,
        identities: IdentityStore | None = None,
        on_mesh: Callable[[Mesh], None] | None = None,
        registry: Registry | None = None,
        registry_debounce: float = 0.0,
        tracing: AnyTracing = NO_TRACING,  # observability.tracing: spans per revision
    ) -> None:
        self.tracing = tracing
        self.identities = identities
        self.registry = registry
        self.file_mesh: Mesh | None = None
        # Registrations arrive one by one (a fleet restarting registers hundreds in a second):
        # changes within this window become one revision.
        self.registry_debounce = registry_debounce
        self._registry_pending: asyncio.TimerHandle | None = None
        self._merger = Merger()
        self._identities_for: Mesh | None = None
        self._required: set[str] = set()
        if registry is not None:
            registry.mesh_check = mesh_check(lambda: self.file_mesh)
            registry.on_change = self.registry_changed
        self.on_mesh = on_mesh
        self._on_mesh_for: Mesh | None = None  # the last mesh served (on_mesh saw it or its file part)
        self.source = source
        self.cache = cache
        self.metrics = metrics
        self.status = ConfigStatus(source=str(source.path))

    def reload(self) -> bool:
        """Load the source once; apply it if valid. Returns True if a new revision is served."""
        trace = self.tracing.revision("file", source=str(self.source.path))
        try:
            with trace.stage("xdsd.load"):
                mesh = self.source.load()
            if mesh is None:
                return False
            self._apply(mesh, trace)
        except MeshError as exc:
            self._reject(exc.errors)
            trace.rejected(exc.errors)
            return False
        except InconsistentSnapshot as exc:
            self.source.forget()
            self._reject([FieldError("", f"internal: generated resources are inconsistent: {exc}")])
            trace.rejected([exc])
            return False
        self.status.last_error = []
        self.metrics.config_valid.set(1)
        return True

    def registry_changed(self) -> None:
        """Apply after the debounce window (at once without one, or outside an event loop)."""
        if self.registry_debounce <= 0:
            self.apply_registry()
            return
        if self._registry_pending is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.apply_registry()
            return
        self._registry_pending = loop.call_later(self.registry_debounce, self.apply_registry)

    def apply_registry(self) -> None:
        """Registrations changed: serve the file's mesh with the new set of live instances."""
        self._registry_pending = None
        if self.file_mesh is None:
            return
        try:
            self._serve(self.file_mesh, self.tracing.revision("registry"))
        except InconsistentSnapshot as exc:  # pragma: no cover - generator bug
            log.error("registry change not applied: %s", exc)

    def _apply(self, mesh: Mesh, trace: AnyRevisionTrace = NULL_REVISION) -> None:
        self._serve(mesh, trace)
        self.file_mesh = mesh
        self.status.loaded_at = time.time()
        self.status.summary = mesh.summary()
        self.metrics.config_reloads.labels("accepted").inc()
        log.info("config revision %d applied: %s", self.cache.revision, self.status.summary)

    def _serve(self, file_mesh: Mesh, trace: AnyRevisionTrace = NULL_REVISION) -> None:
        endpoints_changed = None
        if self.registry is not None:
            mesh = self._merger.merge(file_mesh, self.registry.list())
            # Same file, new registrations: the cache may patch the last snapshots (what the
            # changed services feed) instead of walking every service for every group.
            endpoints_changed = self._merger.endpoints_changed
        else:
            mesh = file_mesh
        if self.identities is not None and self._identities_for is not file_mesh:
            # Registrations add endpoints, never services or sidecars: the identities the mesh needs
            # are those of the file's mesh, worked out (and issued) once per file revision.
            self._required = required_identities(file_mesh)
            self.identities.ensure(
                mesh.mesh.trust_domain, self._required, dt.timedelta(seconds=mesh.mesh.cert_lifetime)
            )
            self._identities_for = file_mesh
        with trace.stage("xdsd.generate"):
            self.cache.set_mesh(mesh, endpoints_changed=endpoints_changed)
        # Generation, serialization and checks: until the new snapshots are ready to be sent
        # (waking the streams that hold them is the fan-out, not the build).
        self.metrics.snapshot_build.observe(self.cache.last_build_seconds)
        trace.served(self.cache.revision)
        if self.on_mesh is not None and not (
            endpoints_changed is not None and endpoints_changed[0] is self._on_mesh_for
        ):
            # Same revision for the authorization service. A registration changes endpoints only,
            # which authorization does not read: it keeps the mesh it has (recompiling every
            # policy and indexing 10,000 services cost ~2 ms per registration).
            self.on_mesh(mesh)
        self._on_mesh_for = mesh
        self.status.revision = self.cache.revision
        self.metrics.config_revision.set(self.cache.revision)
        self.metrics.ready.set(1)

    def _reject(self, errors: list[FieldError]) -> None:
        self.status.last_error = [str(e) for e in errors]
        self.status.last_error_at = time.time()
        self.status.rejections += 1
        self.metrics.config_reloads.labels("rejected").inc()
        self.metrics.config_rejections.inc()
        self.metrics.config_valid.set(0)
        keeping = f"keeping revision {self.cache.revision}" if self.cache.ready else "nothing is served yet"
        log.error(
            "config %s rejected (%d errors; %s):\n  %s",
            self.source.path,
            len(errors),
            keeping,
            "\n  ".join(str(e) for e in errors),
        )

    def refresh(self) -> None:
        """Regenerate from the current mesh (new certificates, same config)."""
        if self.cache.mesh is not None:
            trace = self.tracing.revision("refresh")
            with trace.stage("xdsd.generate"):
                self.cache.set_mesh(self.cache.mesh)
            trace.served(self.cache.revision)
            self.status.revision = self.cache.revision
            self.metrics.config_revision.set(self.cache.revision)

    async def run(self, stop: asyncio.Event) -> None:
        async for _ in self.source.changes(stop):
            self.reload()
