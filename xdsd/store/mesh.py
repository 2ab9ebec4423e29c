"""The mesh in etcd: one key holding the current YAML. ``xdsd apply`` through any replica writes it
with a compare-and-swap on the etcd revision the change was diffed against, so of two concurrent
applies the second gets a conflict (HTTP 409) instead of silently undoing the first; every replica's
watch then serves it. ``--config FILE`` only seeds an empty store. Each accepted revision is also
kept under ``history/<etcd revision>``, written in the same transaction."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable

from xdsd.errors import MeshError, StoreUnavailable
from xdsd.sources.file import parse_bytes
from xdsd.store.etcd import EtcdClient, KeyValue
from xdsd.store.keys import Keys
from xdsd.store.sync import EtcdSync

log = logging.getLogger(__name__)

# (content, allow_removal) -> a rejection to answer, or None if the content may be served.
Precheck = Callable[[bytes, bool], "dict[str, object] | None"]
# (content, how) -> what serving it here gave (the controller's answer to an apply).
Serve = Callable[[bytes, str], "dict[str, object]"]


class EtcdMesh:
    def __init__(self, client: EtcdClient, keys: Keys, sync: EtcdSync, keep: int = 50) -> None:
        self.client = client
        self.keys = keys
        self.sync = sync
        self.keep = max(1, keep)  # history entries kept in etcd (serve --history)

    async def _prune(self) -> None:
        """Drop the oldest history entries beyond ``keep`` (best effort: the next apply tries again)."""
        try:
            keys = await self.client.keys(self.keys.history)
            for key in keys[: max(0, len(keys) - self.keep)]:
                await self.client.delete(key)
        except StoreUnavailable as exc:
            log.warning("pruning the mesh history in etcd: %s", exc)

    @property
    def base(self) -> int:
        """The etcd revision of the mesh this replica serves (0: none yet)."""
        return self.sync.mesh.mod_revision if self.sync.mesh is not None else 0

    def _history(self, content: bytes, how: str, summary: str) -> tuple[bytes, bytes]:
        entry = {"at": time.time(), "how": how, "summary": summary, "content": content.decode("utf-8")}
        # The revision the transaction creates is not known before it runs: key by time instead.
        return self.keys.history + f"{time.time_ns():020d}".encode(), json.dumps(entry).encode()

    async def history(self) -> list[dict[str, object]]:
        """The accepted revisions kept in etcd, oldest first; each numbered by the etcd revision that
        made it the mesh (the same on every replica), with its content under ``content``."""
        _, kvs = await self.client.list(self.keys.history)
        entries = []
        for kv in kvs:
            try:
                data = json.loads(kv.value)
                content = str(data["content"]).encode()
            except (ValueError, KeyError, TypeError):
                continue  # not ours
            entries.append({"revision": kv.mod_revision, "at": data.get("at"), "digest": hashlib.sha256(content).hexdigest(),
                            "how": str(data.get("how", "")), "summary": str(data.get("summary", "")), "content": content})
        return sorted(entries, key=lambda e: int(e["revision"]))  # type: ignore[call-overload]

    async def seed(self, content: bytes, origin: str) -> bool:
        """Store ``content`` as the mesh if etcd holds none yet. True if this call stored it."""
        mesh = parse_bytes(content, origin)  # an invalid seed is refused before anything is written
        done, _ = await self.client.swap(self.keys.mesh, content, 0, also=(self._history(content, "seed", mesh.summary()),))
        if done:
            log.info("etcd held no mesh: seeded it from %s (%s)", origin, mesh.summary())
        return done

    async def apply(self, content: bytes, how: str, allow_removal: bool, base: int | None,
                    precheck: Precheck, serve: Serve) -> tuple[int, dict[str, object]]:
        """(HTTP status, answer) of ``xdsd apply`` through this replica."""
        rejected = precheck(content, allow_removal)
        if rejected is not None:
            return 400, rejected
        if self.sync.mesh is not None and self.sync.mesh.value == content:
            return 200, {"result": "unchanged", "etcd_revision": self.base, "history_revision": self.base}
        expected = self.base if base is None else base
        try:
            summary = parse_bytes(content, "the new config").summary()
        except MeshError as exc:  # pragma: no cover - precheck parsed it
            return 400, {"result": "rejected", "errors": [str(e) for e in exc.errors]}
        # The watch may bring this write back before the swap's answer: it leaves serving it to us.
        self.sync.expected = content
        try:
            done, revision = await self.client.swap(self.keys.mesh, content, expected,
                                                    also=(self._history(content, how, summary),))
        except StoreUnavailable:
            if self.sync.mesh is not None and self.sync.mesh.value == content:
                serve(content, how)  # it was stored after all (the watch saw it)
            raise
        finally:
            self.sync.expected = None
        if not done:
            return 409, {"result": "conflict", "etcd_revision": revision, "errors": [
                f"the mesh in etcd changed (etcd revision {revision}) since the revision {expected} this "
                f"change was diffed against: another apply came first; diff again and re-apply"]}
        # Served here now (the watch brings the same value back and finds nothing new).
        self.sync.mesh = KeyValue(self.keys.mesh, content, revision, self.sync.mesh.create_revision
                                  if self.sync.mesh is not None else revision, 0)
        out = serve(content, how)
        out["etcd_revision"] = out["history_revision"] = revision  # `xdsd history` numbers revisions so
        await self._prune()
        return 200, out
