"""The key layout under ``--etcd-prefix`` (defined once; the README's backup section lists it)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote


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

    def service(self, service: str) -> bytes:
        return self._k(f"registrations/{service}/")  # what the per-service quota counts

    def registration(self, service: str, instance_id: str) -> bytes:
        return self._k(f"registrations/{service}/{instance_id}")  # on the instance's lease

    def address(self, service: str, address: str, port: int) -> bytes:
        """The claim of an address:port within a service (``address`` in its ``address_key`` form):
        holds the instance id, on that instance's lease, written in one transaction with its
        registration (an address:port is one instance's on every replica)."""
        host = f"[{address}]" if ":" in address else address
        return self._k(f"addresses/{service}/{host}:{port}")

    def owner(self, token_id: str) -> bytes:
        return self._k(f"owners/{quote(token_id, safe='')}/")

    def owned(self, token_id: str, service: str, instance_id: str) -> bytes:
        """An instance registered with ``token_id`` (its last registration's token), on its lease:
        the keys under ``owner(token_id)`` are what the per-token quota counts."""
        return self.owner(token_id) + f"{service}/{instance_id}".encode()

    @property
    def replicas(self) -> bytes:
        return self._k("replicas/")

    def replica(self, replica_id: str) -> bytes:
        return self._k(f"replicas/{replica_id}")  # on the replica's lease

    @property
    def token_key(self) -> bytes:
        return self._k("secrets/token-key")  # the signing key: created once, replaced by rotate-key (CAS)

    @property
    def previous_token_keys(self) -> bytes:
        return self._k("secrets/token-keys/")  # <kid>: keys rotated out, still verifying until retired

    def previous_token_key(self, kid: str) -> bytes:
        return self.previous_token_keys + kid.encode()

    @property
    def ca(self) -> bytes:
        return self._k("secrets/ca")  # {"cert": PEM, "key": PEM}: created once, never overwritten

    @property
    def revocations(self) -> bytes:
        return self._k("revocations")  # the content of tokens/revoked.json
