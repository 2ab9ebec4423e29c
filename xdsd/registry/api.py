"""The registration API, twice: gRPC (``xdsd.v1.Registration``, on the xDS port) and HTTP/JSON
(``/v1/...`` on the admin port, so a VM can use curl). Bad input changes nothing and is answered
with INVALID_ARGUMENT / HTTP 400 naming the field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import duration_pb2, json_format, timestamp_pb2

from xdsd.api.v1 import registration_pb2, registration_pb2_grpc
from xdsd.registry.instance import Instance, RegistrationError
from xdsd.registry.registry import NotRegistered, Registry

TOKEN_HEADER = "x-xdsd-token"
# (token or None, service) -> None if allowed, else why not
RegistrationAuth = Callable[[str | None, str], str | None]


def instance_pb(i: Instance) -> registration_pb2.Instance:
    pb = registration_pb2.Instance(
        service=i.service, instance_id=i.instance_id, address=i.address, port=i.port, weight=i.weight,
        zone=i.zone or "", labels=i.labels,
        state=registration_pb2.Instance.DRAINING if i.state == "DRAINING" else registration_pb2.Instance.ACTIVE,
    )
    pb.ttl.CopyFrom(duration_pb2.Duration(seconds=int(i.ttl), nanos=int((i.ttl % 1) * 1e9)))
    pb.expires_at.CopyFrom(timestamp_pb2.Timestamp(seconds=int(i.expires_at), nanos=int((i.expires_at % 1) * 1e9)))
    return pb


class RegistrationServicer(registration_pb2_grpc.RegistrationServicer):
    def __init__(self, registry: Registry, auth: RegistrationAuth | None) -> None:
        self.registry = registry
        self.auth = auth

    async def _authorize(self, context: grpc.aio.ServicerContext, service: str) -> None:
        if self.auth is None:
            return
        token = dict(context.invocation_metadata() or ()).get(TOKEN_HEADER)
        reason = self.auth(token if isinstance(token, str) else None, service)
        if reason is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)

    async def Register(self, request: registration_pb2.RegisterRequest, context: grpc.aio.ServicerContext) -> registration_pb2.Instance:  # noqa: N802
        await self._authorize(context, request.service)
        data: dict[str, Any] = {
            "service": request.service, "instance_id": request.instance_id, "address": request.address,
            "port": request.port, "labels": dict(request.labels),
        }
        if request.weight:
            data["weight"] = request.weight
        if request.zone:
            data["zone"] = request.zone
        if request.HasField("ttl"):
            data["ttl"] = request.ttl.ToTimedelta().total_seconds()
        try:
            return instance_pb(self.registry.register(data))
        except RegistrationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable

    async def Heartbeat(self, request: registration_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext) -> registration_pb2.Instance:  # noqa: N802
        await self._authorize(context, request.service)
        try:
            return instance_pb(self.registry.heartbeat(request.service, request.instance_id))
        except NotRegistered as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
            raise

    async def Deregister(self, request: registration_pb2.DeregisterRequest, context: grpc.aio.ServicerContext) -> registration_pb2.Instance:  # noqa: N802
        await self._authorize(context, request.service)
        try:
            return instance_pb(self.registry.deregister(request.service, request.instance_id))
        except NotRegistered as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
            raise

    async def List(self, request: registration_pb2.ListRequest, context: grpc.aio.ServicerContext) -> registration_pb2.ListResponse:  # noqa: N802
        return registration_pb2.ListResponse(instances=[instance_pb(i) for i in self.registry.list(request.service or None)])


def http_routes(registry: Registry, auth: RegistrationAuth | None) -> list[web.RouteDef]:
    def _token(request: web.Request) -> str | None:
        token = request.headers.get(TOKEN_HEADER)
        if token is None and request.headers.get("authorization", "").lower().startswith("bearer "):
            token = request.headers["authorization"][7:].strip()
        return token

    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text='{"errors": ["body: not valid JSON"]}', content_type="application/json") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text='{"errors": ["body: must be a JSON object"]}', content_type="application/json")
        return data

    def _deny(request: web.Request, service: object) -> web.Response | None:
        if auth is None:
            return None
        reason = auth(_token(request), str(service or ""))
        return None if reason is None else web.json_response({"errors": [reason]}, status=403)

    def _json(i: Instance) -> dict[str, Any]:
        return json_format.MessageToDict(instance_pb(i), preserving_proto_field_name=True)

    async def register(request: web.Request) -> web.Response:
        data = await _body(request)
        if (denied := _deny(request, data.get("service"))) is not None:
            return denied
        try:
            return web.json_response(_json(registry.register(data)))
        except RegistrationError as exc:
            return web.json_response({"errors": [str(e) for e in exc.errors]}, status=400)

    def _ids(data: dict[str, Any]) -> tuple[str, str] | web.Response:
        missing = [f"{k}: required" for k in ("service", "instance_id") if not isinstance(data.get(k), str) or not data.get(k)]
        if missing:
            return web.json_response({"errors": missing}, status=400)
        return data["service"], data["instance_id"]

    def _by_id(op: Callable[[str, str], Instance]) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            data = await _body(request)
            ids = _ids(data)
            if isinstance(ids, web.Response):
                return ids
            if (denied := _deny(request, ids[0])) is not None:
                return denied
            try:
                return web.json_response(_json(op(*ids)))
            except NotRegistered as exc:
                return web.json_response({"errors": [str(exc.args[0])]}, status=404)

        return handle

    async def instances(request: web.Request) -> web.Response:
        return web.json_response({"instances": [_json(i) for i in registry.list(request.query.get("service") or None)]})

    return [
        web.post("/v1/register", register),
        web.post("/v1/heartbeat", _by_id(registry.heartbeat)),
        web.post("/v1/deregister", _by_id(registry.deregister)),
        web.get("/v1/instances", instances),
    ]
