"""Feeds validated mesh revisions from the sources into the cache; keeps the last good one when a
revision is rejected, and remembers why it was."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

from xdsd.ca import Credentials, IdentityStore
from xdsd.cache import InconsistentSnapshot, Snapshot, SnapshotCache
from xdsd.cache.snapshot import Encoder
from xdsd.diff import snapshot_diff
from xdsd.errors import FieldError, MeshError
from xdsd.generators import MeshRevision, generate, required_identities
from xdsd.model import Mesh
from xdsd.model.mesh import Rollout as RolloutSettings
from xdsd.observability.metrics import Metrics
from xdsd.observability.tracing import NO_TRACING, NULL_REVISION, AnyRevisionTrace, AnyTracing
from xdsd.registry.instance import Instance
from xdsd.registry.merge import Merger, mesh_check
from xdsd.registry.registry import Registry
from xdsd.rollout import Fleet, Rollout, choose_canaries
from xdsd.sources.file import FileSource, parse_bytes
from xdsd.sources.history import History, write_atomically
from xdsd.sources.intern import intern
from xdsd.sources.removal import Removal, removal
from xdsd.sources.writes import Outcome

log = logging.getLogger(__name__)

# What a rejection keeps for /debug/config and `xdsd status`: enough to act on, bounded in size.
MAX_ERRORS_KEPT = 50
MAX_ERROR_TEXT = 500


class Health(Protocol):
    """Where failures of work that is not a task of its own are reported (the App's Supervisor)."""

    def track(self, name: str) -> None: ...
    def ok(self, name: str) -> None: ...
    def failed(self, name: str, exc: BaseException) -> None: ...


class _NoHealth:
    def track(self, name: str) -> None:
        pass

    def ok(self, name: str) -> None:
        pass

    def failed(self, name: str, exc: BaseException) -> None:
        pass


def _bounded(errors: list[str]) -> list[str]:
    kept = [e if len(e) <= MAX_ERROR_TEXT else e[:MAX_ERROR_TEXT] + "..." for e in errors[:MAX_ERRORS_KEPT]]
    if len(errors) > MAX_ERRORS_KEPT:
        kept.append(f"... and {len(errors) - MAX_ERRORS_KEPT} more")
    return kept


@dataclass
class ConfigStatus:
    source: str
    revision: int = 0
    loaded_at: float | None = None
    summary: str = ""
    last_error: list[str] = field(default_factory=list)
    last_error_at: float | None = None
    rejections: int = 0
    file: str = "present"  # or "deleted: ..." while the file is gone (the last good mesh is served)
    history_revision: int | None = None  # the accepted file revision being served (xdsd history)
    rollout: dict[str, object] | None = None  # the last staged rollout (mesh.rollout): state, canaries, NACK
    held: dict[str, object] | None = None  # a revision held because it removes most of the mesh

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
            "file": self.file,
            "held": self.held,
            "history_revision": self.history_revision,
            "rollout": self.rollout,
        }


@dataclass
class Held:
    """A valid file revision that removes more than ``max_removal`` of the mesh, waiting for the
    file to stay unchanged for ``settle`` seconds."""

    mesh: Mesh
    digest: str | None
    since: float
    removal: Removal
    timer: asyncio.TimerHandle | None = None


@dataclass(frozen=True, slots=True)
class _DiffInputs:
    """The served state a diff compares a candidate against, copied on the loop for a worker thread."""

    served: Mesh | None
    registrations: list[Instance] | None
    current: list[tuple[Hashable, Snapshot | None]]
    credentials: Credentials | None
    digest: str | None


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
        health: Health | None = None,
        max_removal: float = 0.5,
        settle: float = 5.0,
        history: History | None = None,
        fleet: Fleet | None = None,
    ) -> None:
        self.history = history  # accepted file revisions (xdsd history / rollback)
        # The connected proxies (the server), for staged rollouts: None disables them.
        self.fleet = fleet
        self.rollout: Rollout | None = None
        self._rollout_timer: asyncio.TimerHandle | None = None
        self._candidate_merger = Merger()
        self.tracing = tracing
        # A file revision removing more than this share of the services, gateways or endpoints is held
        # until the file has stayed unchanged for ``settle`` seconds (torn and truncated writes).
        self.max_removal = max_removal
        self.settle = settle
        self.held: Held | None = None
        self.health: Health = health or _NoHealth()
        for name in ("config-apply", "registry-apply", "refresh"):
            self.health.track(name)
        self.identities = identities
        self.registry = registry
        self.file_mesh: Mesh | None = None
        self._file_changed: frozenset[str] | None = None  # of the revision being loaded (sources.intern)
        # Registrations arrive one by one (a fleet restarting registers hundreds in a second):
        # changes within this window become one revision.
        self.registry_debounce = registry_debounce
        self._registry_pending: asyncio.TimerHandle | None = None
        self._merger = Merger()
        self._identities_for: tuple[Mesh | None, Mesh | None] | None = None
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

    def reload(self, allow_removal: bool = False, how: str = "file") -> bool:
        """Load the source once; apply it if valid (hold it if it removes most of the mesh, unless
        ``allow_removal``). Returns True if a new revision is served."""
        trace = self.tracing.revision("file", source=str(self.source.path))
        try:
            with trace.stage("xdsd.load"):
                mesh = self.source.load()
            self.status.file = "present"
            if mesh is None:
                if allow_removal and self.held is not None and self.held.digest == self.source.digest():
                    mesh = self.held.mesh  # `xdsd apply --allow-removal` of the content being held
                else:
                    return False
            mesh, self._file_changed = intern(self.file_mesh, mesh)
            removed = removal(self.file_mesh, mesh)
            if removed.exceeds(self.max_removal) and not allow_removal:
                self._hold(mesh, removed)
                trace.rejected([FieldError("", f"held: removes {removed.summary()}")])
                return False
            self._clear_hold()
            self._apply(mesh, trace, how)
        except MeshError as exc:
            self._reject(exc.errors)
            trace.rejected(exc.errors)
            return False
        except InconsistentSnapshot as exc:
            self.source.forget()
            self._reject([FieldError("", f"internal: generated resources are inconsistent: {exc}")])
            trace.rejected([exc])
            return False
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the watcher: keep serving the last revision
            log.exception("config %s not applied: internal error", self.source.path)
            self.source.forget()
            self._reject([FieldError("", f"internal error while applying the config: {type(exc).__name__}: {exc}")])
            trace.rejected([exc])
            self.health.failed("config-apply", exc)
            return False
        self.status.last_error = []
        self.metrics.config_valid.set(1)
        self.health.ok("config-apply")
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
        except Exception as exc:  # noqa: BLE001 - counted and shown on /readyz; the last revision stays
            log.exception("registry change not applied")
            self.health.failed("registry-apply", exc)
            return
        self.health.ok("registry-apply")

    def _apply(self, mesh: Mesh, trace: AnyRevisionTrace = NULL_REVISION, how: str = "file") -> None:
        settings = mesh.mesh.rollout
        if (settings is not None and self.fleet is not None and self.file_mesh is not None
                and not how.startswith("rollback")):
            canaries = choose_canaries(self.fleet.clusters(), settings.canary)
            if canaries:
                self._start_rollout(mesh, canaries, settings, how, trace)
                return
        self._end_rollout("superseded")
        self._serve(mesh, trace)
        self._accepted(mesh, how)

    def _accepted(self, mesh: Mesh, how: str) -> None:
        """``mesh`` (a file revision) is what everyone is served now."""
        self.file_mesh = mesh
        self.status.loaded_at = time.time()
        self.status.summary = mesh.summary()
        if self.history is not None and self.source.content is not None:
            self.status.history_revision = self.history.record(self.source.content, how, self.status.summary).revision
        self.metrics.config_reloads.labels("accepted").inc()
        log.info("config revision %d applied: %s", self.cache.revision, self.status.summary)

    def _serve(self, file_mesh: Mesh, trace: AnyRevisionTrace = NULL_REVISION) -> None:
        # A new file revision that changed only some services' endpoints (sources.intern), or new
        # registrations: the cache may patch the last snapshots (what the changed services feed)
        # instead of walking every service for every group.
        file_changed = self._file_changed if file_mesh is not self.file_mesh else None
        self._file_changed = None
        endpoints_changed = None
        if self.registry is not None:
            mesh = self._merger.merge(file_mesh, self.registry.list(), file_changed)
            endpoints_changed = self._merger.endpoints_changed
        else:
            mesh = file_mesh
            if file_changed is not None and self.file_mesh is not None:
                endpoints_changed = (self.file_mesh, file_changed)
        canary = None
        rollout = self.rollout if self.rollout is not None and self.rollout.active else None
        if rollout is not None:
            # Canary groups are served the candidate (with the same live registrations); no patching
            # while two meshes are served.
            canary = (self._candidate_merger.merge(rollout.candidate, self.registry.list())
                      if self.registry is not None else rollout.candidate)
            endpoints_changed = None
        identities_for = (file_mesh, rollout.candidate if rollout is not None else None)
        if self.identities is not None and self._identities_for != identities_for:
            # Registrations add endpoints, never services or sidecars: the identities the mesh needs
            # are those of the file's mesh (and a rollout's candidate), worked out once per revision.
            self._required = required_identities(file_mesh)
            if rollout is not None:
                self._required |= required_identities(rollout.candidate)
            self.identities.ensure(
                mesh.mesh.trust_domain, self._required, dt.timedelta(seconds=mesh.mesh.cert_lifetime)
            )
            self._identities_for = identities_for
        with trace.stage("xdsd.generate"):
            self.cache.update(MeshRevision(mesh, canary), hint=endpoints_changed)
        # Generation, serialization and checks: until the new snapshots are ready to be sent
        # (waking the streams that hold them is the fan-out, not the build).
        self.metrics.snapshot_build.observe(self.cache.last_build_seconds)
        trace.served(self.cache.revision)
        if self.on_mesh is not None and not (
            endpoints_changed is not None and endpoints_changed[0] is self._on_mesh_for
        ):
            # Same revision for the authorization service. A registration changes endpoints only,
            # which authorization does not read: it keeps the mesh it has (its compiled policies).
            self.on_mesh(mesh)
        self._on_mesh_for = mesh
        self.status.revision = self.cache.revision
        self.metrics.config_revision.set(self.cache.revision)
        self.metrics.ready.set(1)

    def _reject(self, errors: list[FieldError]) -> None:
        self.status.last_error = _bounded([str(e) for e in errors])
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
        """Regenerate the revision being served (new certificates, same config)."""
        if self.cache.ready:
            trace = self.tracing.revision("refresh")
            try:
                with trace.stage("xdsd.generate"):
                    self.cache.update(self.cache.input)
            except Exception as exc:  # noqa: BLE001 - counted and shown on /readyz
                log.exception("refresh (new certificates) not applied")
                self.health.failed("refresh", exc)
                return
            self.health.ok("refresh")
            trace.served(self.cache.revision)
            self.status.revision = self.cache.revision
            self.metrics.config_revision.set(self.cache.revision)

    # -- holding revisions that remove most of the mesh -------------------------------------------

    def _hold(self, mesh: Mesh, removed: Removal) -> None:
        self._clear_hold()
        now = time.time()
        held = self.held = Held(mesh, self.source.digest(), now, removed)
        self.status.held = {"since": now, "apply_at": now + self.settle, "removes": removed.as_json(),
                            "summary": mesh.summary()}
        self.metrics.config_held.inc()
        log.warning("config %s removes %s at once: held; it is applied if the file stays unchanged for %ss "
                    "(xdsd apply --allow-removal applies it now)", self.source.path, removed.summary(), self.settle)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        held.timer = loop.call_later(self.settle, self._settled, held)

    def _clear_hold(self) -> None:
        if self.held is not None and self.held.timer is not None:
            self.held.timer.cancel()
        self.held = None
        self.status.held = None

    def _settled(self, held: Held) -> None:
        """The settle period of a held revision is over: apply it if the file still holds it."""
        if self.held is not held:
            return
        try:
            current = self.source.read()
        except MeshError:
            return  # gone meanwhile: the deletion is reported by the watcher
        if hashlib.sha256(current).hexdigest() != held.digest:
            return  # changed meanwhile: its own load decides
        log.info("config %s unchanged for %ss: applying the held revision", self.source.path, self.settle)
        self.reload(allow_removal=True)

    def deleted(self) -> None:
        """The file is gone: keep serving the last good mesh, and say so."""
        self._clear_hold()
        keeping = f"serving revision {self.cache.revision}" if self.cache.ready else "nothing is served yet"
        self.status.file = f"deleted: {keeping} until it is back"
        log.warning("config %s was deleted; %s until it is back", self.source.path, keeping)
        self.source.forget()  # whatever comes back is loaded, even the same content

    # -- staged rollouts ---------------------------------------------------------------------------

    def _start_rollout(self, candidate: Mesh, canaries: frozenset[str], settings: RolloutSettings, how: str,
                       trace: AnyRevisionTrace) -> None:
        assert self.fleet is not None and self.file_mesh is not None
        previous = self.rollout.canaries if self.rollout is not None and self.rollout.active else frozenset()
        self._end_rollout("superseded", unmark=False)
        rollout = self.rollout = Rollout(self.file_mesh, candidate, canaries, settings, how)
        self._serve(self.file_mesh, trace)
        self.fleet.set_canary(previous - canaries, False)
        self.fleet.set_canary(canaries, True)
        self.status.rollout = rollout.as_json()
        self.metrics.rollouts.labels("started").inc()
        log.info("staged rollout: %d canary proxies get the new revision (%s) first; the others in %ss unless one "
                 "NACKs it", len(canaries), candidate.summary(), settings.wait)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._rollout_timer = loop.call_later(settings.wait, self._promote, rollout)

    def _end_rollout(self, result: str, unmark: bool = True) -> Rollout | None:
        rollout = self.rollout
        if rollout is None or not rollout.active:
            return None
        rollout.result = result
        if self._rollout_timer is not None:
            self._rollout_timer.cancel()
            self._rollout_timer = None
        self.rollout = None
        self.status.rollout = rollout.as_json()
        self.metrics.rollouts.labels(result).inc()
        if unmark and self.fleet is not None:
            self.fleet.set_canary(rollout.canaries, False)
        return rollout

    def _promote(self, rollout: Rollout) -> None:
        """No canary NACKed within ``wait``: everyone gets the candidate."""
        if self.rollout is not rollout or not rollout.active:
            return
        log.info("staged rollout: no canary NACKed within %ss; serving the new revision everywhere", rollout.settings.wait)
        rollout.result = "promoted"
        self.rollout = None
        self._rollout_timer = None
        trace = self.tracing.revision("rollout", source=str(self.source.path))
        try:
            self._serve(rollout.candidate, trace)
        except Exception as exc:  # noqa: BLE001 - the canaries go back; the previous revision stays
            log.exception("staged rollout: promoting failed")
            self.health.failed("config-apply", exc)
            rollout.result = "rolled_back"
            self._serve(rollout.previous, trace)
        else:
            self._accepted(rollout.candidate, rollout.how)
        self.status.rollout = rollout.as_json()
        self.metrics.rollouts.labels(rollout.result).inc()
        if self.fleet is not None:
            self.fleet.set_canary(rollout.canaries, False)

    def canary_nacked(self, node_id: str, canary_group: bool, type_url: str, error: str) -> None:
        """A proxy NACKed something: if it is a canary of the rollout under way, roll back."""
        rollout = self.rollout
        if rollout is None or not rollout.active or not canary_group or node_id not in rollout.canaries:
            return
        rollout.nack = {"node": node_id, "type": type_url.rsplit(".", 1)[-1], "error": error[:500]}
        try:
            asyncio.get_running_loop().call_soon(self._roll_back, rollout)
        except RuntimeError:
            self._roll_back(rollout)

    def _roll_back(self, rollout: Rollout) -> None:
        if self.rollout is not rollout or not rollout.active:
            return
        self._end_rollout("rolled_back", unmark=False)
        trace = self.tracing.revision("rollout", source=str(self.source.path))
        self._serve(rollout.previous, trace)  # the canaries' groups are built from the previous mesh again
        if self.fleet is not None:
            self.fleet.set_canary(rollout.canaries, False)
        nack = rollout.nack or {}
        error = (f"staged rollout rolled back: canary {nack.get('node')!r} NACKed {nack.get('type')}: "
                 f"{nack.get('error')}; the other proxies never got it")
        self._reject([FieldError("", error)])
        trace.rejected([error])

    # -- operator tools: diff, apply, rollback ----------------------------------------------------

    def diff(self, content: bytes) -> dict[str, object]:
        """What serving ``content`` as the mesh file would change, per connected node group.
        Raises MeshError if it is not a valid mesh."""
        return self._diff_report(parse_bytes(content, "the candidate"), content, self._diff_inputs())

    async def diff_off_loop(self, content: bytes) -> dict[str, object]:
        """``diff`` with its work (validation, which imports processors and reads files; SVIDs for
        new identities; generating every group) in a worker thread: only the served state is read
        on the loop, and the thread gets immutable copies of it (snapshots, mesh, registrations)."""
        candidate = await asyncio.to_thread(parse_bytes, content, "the candidate")
        return await asyncio.to_thread(self._diff_report, candidate, content, self._diff_inputs())

    def _diff_inputs(self) -> _DiffInputs:
        """What a diff compares against, read on the loop (the registry and cache are the loop's)."""
        groups = sorted(self.cache.groups(), key=str)
        return _DiffInputs(
            served=self.file_mesh,
            registrations=self.registry.list() if self.registry is not None else None,
            current=[(g, self.cache.current(g)) for g in groups],
            credentials=self.identities.credentials if self.identities is not None else None,
            digest=self.source.digest(),
        )

    def _diff_report(self, candidate: Mesh, content: bytes, inputs: _DiffInputs) -> dict[str, object]:
        """Pure of the loop's state: runs in a worker thread (``diff_off_loop``)."""
        merged = Merger().merge(candidate, inputs.registrations) if inputs.registrations is not None else candidate
        credentials = self._candidate_credentials(candidate, inputs.credentials)
        groups: dict[str, object] = {}
        for group, current in inputs.current:
            new = Snapshot.build(group, 0, generate(merged, group, credentials), Encoder())
            changes = snapshot_diff(current, new)
            if changes:
                groups[str(group)] = changes
        removed = removal(inputs.served, candidate)
        return {"valid": True, "groups": groups, "summary": candidate.summary(),
                "removes": removed.as_json(), "would_hold": removed.exceeds(self.max_removal),
                "unchanged": hashlib.sha256(content).hexdigest() == inputs.digest}

    def _candidate_credentials(self, mesh: Mesh, creds: Credentials | None) -> Credentials:
        """The current SVIDs, plus throw-away ones for identities the candidate adds (so its
        secrets appear in a diff by name; nothing is kept)."""
        if self.identities is None or creds is None:
            return Credentials()
        svids = dict(creds.svids)
        for sid in required_identities(mesh) - svids.keys():
            svids[sid] = self.identities.ca.issue(sid, dt.timedelta(seconds=mesh.mesh.cert_lifetime))
        return Credentials(mesh.mesh.trust_domain, creds.bundle_pem or self.identities.ca.bundle_pem, svids)

    def precheck(self, content: bytes, allow_removal: bool = False) -> dict[str, object] | None:
        """Why ``content`` may not replace the served mesh (invalid; removes most of it without
        ``allow_removal``), or None. For a shared store, which is written before anything is served."""
        try:
            candidate = parse_bytes(content, "the new config")
        except MeshError as exc:
            return {"result": "rejected", "errors": _bounded([str(e) for e in exc.errors])}
        removed = removal(self.file_mesh, candidate)
        if removed.exceeds(self.max_removal) and not allow_removal:
            return {"result": "rejected", "removes": removed.as_json(), "errors": [
                f"removes {removed.summary()} at once: give --allow-removal to apply it"]}
        return None

    def apply_content(self, content: bytes, how: str = "apply", allow_removal: bool = False) -> dict[str, object]:
        """Validate ``content``, write it over the mesh file atomically, and load it now (``xdsd
        apply``, ``xdsd rollback``). An invalid content writes nothing."""
        try:
            parse_bytes(content, "the new config")
        except MeshError as exc:
            return {"result": "rejected", "errors": _bounded([str(e) for e in exc.errors])}
        if hashlib.sha256(content).hexdigest() == self.source.digest() and self.held is None:
            return {"result": "unchanged", "revision": self.cache.revision, "history_revision": self.status.history_revision}
        write_atomically(self.source.path, content)
        applied = self.reload(allow_removal=allow_removal, how=how)
        if applied and self.rollout is not None and self.rollout.active:
            return {"result": "rolling-out", "rollout": self.status.rollout, "revision": self.cache.revision}
        if applied:
            return {"result": "applied", "revision": self.cache.revision, "history_revision": self.status.history_revision,
                    "summary": self.status.summary}
        if self.held is not None:
            return {"result": "held", "held": self.status.held}
        return {"result": "rejected", "errors": self.status.last_error}

    def rollback(self, to: int | None = None) -> dict[str, object]:
        """Make an earlier accepted revision current again, by writing it back into the file."""
        if self.history is None:
            return {"result": "rejected", "errors": ["no history is kept"]}
        entry = self.history.previous() if to is None else next((e for e in self.history.entries if e.revision == to), None)
        found = self.history.get(entry.revision) if entry is not None else None
        if found is None:
            known = ", ".join(str(e.revision) for e in self.history.entries) or "none"
            return {"result": "rejected", "errors": [f"no revision {to if to is not None else 'before the current one'} "
                                                     f"in the history (kept: {known})"]}
        out = self.apply_content(found[1], how=f"rollback to {found[0].revision}", allow_removal=True)
        out["to"] = found[0].revision
        return out

    async def run(self, stop: asyncio.Event) -> None:
        async for outcome in self.source.changes(stop):
            if outcome is Outcome.DELETED:
                self.deleted()
            else:
                self.reload()
