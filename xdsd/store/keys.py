"""The key layout under ``--etcd-prefix`` (defined once; the README's backup section lists it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str  # "/xdsd"

    def _k(self, rest: str) -> bytes:
        return (self.prefix + "/" + rest).encode()

    @property
    def root(self) -> bytes:
        return self._k("")  # "/xdsd/": every key of this mesh (not those of "/xdsd2")

    @property
    def mesh(self) -> bytes:
        return self._k("mesh")  # the current mesh YAML; its mod revision is what apply swaps against

    @property
    def history(self) -> bytes:
        return self._k("history/")  # history/<etcd revision>: {content, at, how, summary}

    @property
    def registrations(self) -> bytes:
        return self._k("registrations/")

    def registration(self, service: str, instance_id: str) -> bytes:
        return self._k(f"registrations/{service}/{instance_id}")  # on the instance's lease

    @property
    def replicas(self) -> bytes:
        return self._k("replicas/")

    def replica(self, replica_id: str) -> bytes:
        return self._k(f"replicas/{replica_id}")  # on the replica's lease

    @property
    def token_key(self) -> bytes:
        return self._k("secrets/token-key")  # created once, never overwritten

    @property
    def ca(self) -> bytes:
        return self._k("secrets/ca")  # {"cert": PEM, "key": PEM}: created once, never overwritten

    @property
    def revocations(self) -> bytes:
        return self._k("revocations")  # the content of tokens/revoked.json
