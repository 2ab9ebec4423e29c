"""How much of the mesh a new file revision removes: services, gateways, and the file's endpoints.

A revision that removes more than ``--max-removal`` of any of them at once is held (applied only if
the file stays unchanged for ``--settle``): a half-written or truncated file looks exactly like that.
Registrations are not counted: they come and go on their own and are never held.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsd.model import Mesh

MAX_LISTED = 20


@dataclass(frozen=True, slots=True)
class Removal:
    services: tuple[str, ...]
    gateways: tuple[str, ...]
    endpoints: tuple[str, ...]  # "service/address:port"
    fractions: dict[str, float]  # category -> removed / before

    def exceeds(self, limit: float) -> bool:
        return any(f > limit for f in self.fractions.values())

    def as_json(self) -> dict[str, object]:
        return {
            "services": list(self.services[:MAX_LISTED]),
            "gateways": list(self.gateways[:MAX_LISTED]),
            "endpoints": len(self.endpoints),
            "fractions": {k: round(v, 3) for k, v in self.fractions.items()},
        }

    def summary(self) -> str:
        parts = [f"{len(v)} of the {k}" for k, v in (("services", self.services), ("gateways", self.gateways),
                                                     ("endpoints", self.endpoints)) if v]
        return ", ".join(parts) or "nothing"


def _endpoints(mesh: Mesh) -> set[str]:
    return {f"{name}/{e.address}:{e.port}" for name in mesh.services for e in mesh.endpoints_of(name)}


def removal(before: Mesh | None, after: Mesh) -> Removal:
    if before is None:
        return Removal((), (), (), {})
    services = sorted(set(before.services) - set(after.services))
    gateways = sorted(set(before.gateways) - set(after.gateways))
    old_endpoints = _endpoints(before)
    endpoints = sorted(old_endpoints - _endpoints(after))
    fractions: dict[str, float] = {}
    for key, gone, total in (("services", services, len(before.services)), ("gateways", gateways, len(before.gateways)),
                             ("endpoints", endpoints, len(old_endpoints))):
        if total:
            fractions[key] = len(gone) / total
    return Removal(tuple(services), tuple(gateways), tuple(endpoints), fractions)
