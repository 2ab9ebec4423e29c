"""The mesh config as typed, frozen pydantic models. Field-level rules live in ``fields``;
rules that span several fields (references, duplicates) live in ``crosscheck``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from xdsd.model.fields import Host, IPAddress, Name, PathPrefix, Port, PositiveDuration, Weight


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class Endpoint(_Model):
    """One instance of a service: where its traffic goes."""

    address: Host
    port: Port
    weight: Weight = 1
    zone: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class Service(_Model):
    endpoints: list[Endpoint] = Field(default_factory=list)
    # HTTP protocol spoken by the service's instances.
    protocol: Literal["http1", "http2"] = "http1"
    connect_timeout: PositiveDuration = 1.0


class Listen(_Model):
    address: IPAddress
    port: Port


class GatewayRoute(_Model):
    prefix: PathPrefix
    service: Name


class Gateway(_Model):
    """An edge Envoy: an Envoy whose ``node.cluster`` is the gateway's name."""

    listen: Listen
    routes: list[GatewayRoute] = Field(default_factory=list)


class Mesh(_Model):
    services: dict[Name, Service] = Field(default_factory=dict)
    gateways: dict[Name, Gateway] = Field(default_factory=dict)

    def summary(self) -> str:
        endpoints = sum(len(s.endpoints) for s in self.services.values())
        routes = sum(len(g.routes) for g in self.gateways.values())
        return (
            f"{len(self.services)} services, {endpoints} endpoints, "
            f"{len(self.gateways)} gateways, {routes} routes"
        )
