"""The operations the registration API calls, behind a store: ``LocalRegistrations`` is the
registry itself (the state directory saves it); ``xdsd.store.registrations.EtcdRegistrations``
writes to etcd first and answers only once etcd took the write."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from xdsd.registry.instance import Instance, RegistrationInput
from xdsd.registry.registry import Registry


class Registrations(Protocol):
    registry: Registry

    async def register(self, reg: Mapping[str, Any] | RegistrationInput, token_id: str = "") -> Instance: ...
    async def heartbeat(self, service: str, instance_id: str) -> Instance: ...
    async def deregister(self, service: str, instance_id: str) -> Instance: ...
    async def listed(self, service: str | None = None) -> list[Instance]: ...


class LocalRegistrations:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def register(self, reg: Mapping[str, Any] | RegistrationInput, token_id: str = "") -> Instance:
        return self.registry.register(reg, token_id)

    async def heartbeat(self, service: str, instance_id: str) -> Instance:
        return self.registry.heartbeat(service, instance_id)

    async def deregister(self, service: str, instance_id: str) -> Instance:
        return self.registry.deregister(service, instance_id)

    async def listed(self, service: str | None = None) -> list[Instance]:
        return self.registry.list(service)


