"""xdsd's generator as the cache sees it (``cache.inputs.Generator``): a revision is a mesh (and,
during a staged rollout, the mesh canary groups get); a key is a node group. It owns the memo that
lets revisions reuse what did not change, and reads the current credentials when it generates."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

from xdsd.ca import Credentials
from xdsd.cache.inputs import Generated
from xdsd.generators.assemble import generate
from xdsd.generators.memo import Memo
from xdsd.model import Mesh
from xdsd.node import NodeGroup


@dataclass(frozen=True, slots=True)
class MeshRevision:
    mesh: Mesh
    canary: Mesh | None = None  # staged rollout: what groups marked canary are served


class MeshGenerator:
    def __init__(self, credentials: Callable[[], Credentials] = Credentials) -> None:
        self.memo = Memo()
        self._credentials = credentials
        self._mesh: Mesh | None = None
        self._canary: Mesh | None = None
        self._partial = False

    @property
    def mesh(self) -> Mesh | None:
        return self._mesh

    def begin(self, revision: object, hint: object = None) -> None:
        """``hint``: ``(base, services)`` when the revision's mesh is ``base`` with new endpoints for
        ``services`` and nothing else changed (a registration). If ``base`` is the mesh of the last
        revision, each group's last output is patched instead of generated again (``patch``)."""
        rev = revision if isinstance(revision, MeshRevision) else MeshRevision(revision)  # type: ignore[arg-type]
        partial = (isinstance(hint, tuple) and self._mesh is not None and hint[0] is self._mesh
                   and rev.canary is None and self._canary is None)
        self.memo.endpoints_changed = hint if partial else None  # type: ignore[assignment]
        self._partial = partial
        self._mesh, self._canary = rev.mesh, rev.canary

    def generate(self, key: Hashable) -> Generated:
        assert isinstance(key, NodeGroup) and self._mesh is not None
        mesh = self._canary if key.canary and self._canary is not None else self._mesh
        return generate(mesh, key, self._credentials(), self.memo)

    def end(self) -> None:
        # A patched revision uses (touches) only what the changed services feed: keep the rest.
        self.memo.endpoints_changed = None
        self.memo.sweep(partial=self._partial)
        self._partial = False
