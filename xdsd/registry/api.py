"""The registration API, twice: gRPC (``xdsd.v1.Registration``, on the xDS port) and HTTP/JSON
(``/v1/...`` on the admin port, so a VM can use curl).

Who may call (``Access``): Register, Heartbeat and Deregister need a node token for the service
named in the request; List needs any valid token (node or operator). With ``Access.off()``
everyone may.

Answers: bad input changes nothing and is answered 400 / INVALID_ARGUMENT naming each field (413
for a body over ``body.MAX_BODY``); no or a bad token 401 / UNAUTHENTICATED, a token that does not
allow it 403 / PERMISSION_DENIED; over a quota 429 / RESOURCE_EXHAUSTED; an unknown instance 404 /
NOT_FOUND. Error bodies are ``{"errors": ["field: message", ...]}``. Nothing a client sends gets a
5xx: an unexpected exception is a bug, logged, and answered 500 / INTERNAL; the one 5xx is the shared
store (etcd) unable to take a write, 503 / UNAVAILABLE naming it (nothing changed; try again)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import duration_pb2

from xdsd.api.v1 import registration_pb2, registration_pb2_grpc
from xdsd.auth.access import Access, Denied, token_from_headers, token_from_metadata
from xdsd.errors import FieldError, StoreUnavailable
from xdsd.registry.body import MAX_BODY, BodyTooLarge, parse_body
from xdsd.registry.instance import (
    Instance,
    RegistrationError,
    RegistrationInput,
    check_ids,
    check_service_filter,
    instance_json,
    instance_pb,
    key_path,
)
from xdsd.registry.ops import LocalRegistrations, Registrations
from xdsd.registry.registry import NotRegistered, QuotaExceeded, Registry

log = logging.getLogger(__name__)

__all__ = ["RegistrationServicer", "http_routes", "instance_pb"]

# gRPC details travel in a header (grpc-message): long lists of errors are cut to this.
MAX_DETAILS = 2000


# -- gRPC ---------------------------------------------------------------------------------


def _details(errors: list[FieldError]) -> str:
    text = "; ".join(str(e) for e in errors)
    return text if len(text) <= MAX_DETAILS else text[: MAX_DETAILS - 3] + "..."


def _grpc_status(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The status a client error is answered with; None for anything else (a bug)."""
    if isinstance(exc, Denied):
        return (grpc.StatusCode.UNAUTHENTICATED if exc.unauthenticated else grpc.StatusCode.PERMISSION_DENIED), str(exc)
    if isinstance(exc, QuotaExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, _details(exc.errors)
    if isinstance(exc, RegistrationError):
        return grpc.StatusCode.INVALID_ARGUMENT, _details(exc.errors)
    if isinstance(exc, NotRegistered):
        return grpc.StatusCode.NOT_FOUND, str(exc.args[0])
    if isinstance(exc, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"not stored: {exc}"
    return None


def _duration_seconds(d: duration_pb2.Duration) -> float:
    """A Duration as seconds (no ToTimedelta: timedelta's range is smaller than Duration's)."""
    if not -999_999_999 <= d.nanos <= 999_999_999 or (d.seconds > 0 > d.nanos) or (d.seconds < 0 < d.nanos):
        raise RegistrationError([FieldError("ttl", "not a valid Duration (nanos out of range or of another sign than seconds)")])
    return d.seconds + d.nanos / 1e9


def registration_of(request: registration_pb2.RegisterRequest) -> RegistrationInput:
    """A RegisterRequest through the same rules as a JSON body. proto3 cannot tell an unset field
    from its zero value: 0 for weight and "" for instance_id and zone mean the default."""
    data: dict[str, Any] = {"service": request.service, "address": request.address, "port": request.port,
                            "labels": dict(request.labels)}
    if request.instance_id:
        data["instance_id"] = request.instance_id
    if request.weight:
        data["weight"] = request.weight
    if request.zone:
        data["zone"] = request.zone
    if request.HasField("ttl"):
        data["ttl"] = _duration_seconds(request.ttl)
    return RegistrationInput.parse(data)


class RegistrationServicer(registration_pb2_grpc.RegistrationServicer):
    def __init__(self, registry: Registry, access: Access, ops: Registrations | None = None) -> None:
        self.registry = registry
        self.access = access
        self.ops = ops or LocalRegistrations(registry)

    async def _answer(self, context: grpc.aio.ServicerContext, op: Callable[[str | None], Awaitable[Any]]) -> Any:
        """``await op(token)``; a client error becomes its status, anything else INTERNAL (logged)."""
        try:
            return await op(token_from_metadata(context.invocation_metadata()))
        except Exception as exc:
            status = _grpc_status(exc)
            if status is None:
                log.exception("registration API (gRPC) failed")
                status = grpc.StatusCode.INTERNAL, "internal error"
        await _abort(context, *status)

    async def Register(self, request: registration_pb2.RegisterRequest, context: grpc.aio.ServicerContext) -> registration_pb2.Instance:  # noqa: N802
        async def op(token: str | None) -> registration_pb2.Instance:
            self.access.caller(token)
            reg = registration_of(request)
            caller = self.access.service(token, reg.service)
            return instance_pb(await self.ops.register(reg, caller.token_id))

        return await self._answer(context, op)  # type: ignore[no-any-return]

    async def Heartbeat(self, request: registration_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext) -> registration_pb2.Instance:  # noqa: N802
        return await self._answer(context, self._by_id(request, self.ops.heartbeat))  # type: ignore[no-any-return]

    async def Deregister(self, request: registration_pb2.DeregisterRequest, context: grpc.aio.ServicerContext) -> registration_pb2.Instance:  # noqa: N802
        return await self._answer(context, self._by_id(request, self.ops.deregister))  # type: ignore[no-any-return]

    def _by_id(self, request: registration_pb2.HeartbeatRequest | registration_pb2.DeregisterRequest,
               action: Callable[[str, str], Awaitable[Instance]]) -> Callable[[str | None], Awaitable[registration_pb2.Instance]]:
        async def op(token: str | None) -> registration_pb2.Instance:
            self.access.caller(token)
            service, instance_id = check_ids(request.service, request.instance_id)
            self.access.service(token, service)
            return instance_pb(await action(service, instance_id))

        return op

    async def List(self, request: registration_pb2.ListRequest, context: grpc.aio.ServicerContext) -> registration_pb2.ListResponse:  # noqa: N802
        async def op(token: str | None) -> registration_pb2.ListResponse:
            self.access.caller(token)
            service = check_service_filter(request.service)
            return registration_pb2.ListResponse(instances=[instance_pb(i) for i in await self.ops.listed(service)])

        return await self._answer(context, op)  # type: ignore[no-any-return]


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


# -- HTTP ---------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _errors(status: int, errors: list[str], headers: dict[str, str] | None = None) -> web.Response:
    # json_response escapes non-ASCII (and any surrogate in a message) as \\uXXXX: always encodable.
    return web.json_response({"errors": errors}, status=status, headers=headers)


def _http_error(exc: Exception) -> web.Response | None:
    """The answer to a client error; None for anything else (a bug)."""
    if isinstance(exc, Denied):
        if exc.unauthenticated:
            return _errors(401, [str(exc)], {"WWW-Authenticate": 'Bearer realm="xdsd"'})
        return _errors(403, [str(exc)])
    if isinstance(exc, QuotaExceeded):
        return _errors(429, [str(e) for e in exc.errors])
    if isinstance(exc, BodyTooLarge):
        return _errors(413, [str(e) for e in exc.errors])
    if isinstance(exc, RegistrationError):
        return _errors(400, [str(e) for e in exc.errors])
    if isinstance(exc, NotRegistered):
        return _errors(404, [str(exc.args[0])])
    if isinstance(exc, StoreUnavailable):
        return _errors(503, [f"not stored: {exc}"], {"Retry-After": "1"})
    return None


def _guarded(handler: Handler) -> Handler:
    """Client errors become their 4xx; an unexpected exception is logged and answered 500."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:
            answer = _http_error(exc)
            if answer is None:
                log.exception("registration API (HTTP) failed: %s %s", request.method, request.path)
                answer = _errors(500, ["internal error"])
            return answer

    return guarded


async def read_body(request: web.Request) -> bytes:
    """The body, at most MAX_BODY bytes (read no further: a larger one is refused while it arrives)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BodyTooLarge([FieldError("body", f"larger than {MAX_BODY} bytes")])
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := await request.content.read(65536):
            size += len(chunk)
            if size > MAX_BODY:
                raise BodyTooLarge([FieldError("body", f"larger than {MAX_BODY} bytes")])
            chunks.append(chunk)
    except (OSError, HttpProcessingError, ClientPayloadError) as exc:  # cut short, badly framed: the client's doing
        raise RegistrationError([FieldError("body", f"could not be read: {type(exc).__name__}")]) from None
    return b"".join(chunks)


def _token(request: web.Request) -> str | None:
    return token_from_headers(request.headers)  # case-insensitive


def _ids(data: dict[str, Any]) -> tuple[str, str]:
    """The (service, instance_id) body of a heartbeat or deregistration."""
    errors = [FieldError(key_path("", k), "unknown field") for k in data if k not in ("service", "instance_id")]
    try:
        ids = check_ids(data.get("service", ""), data.get("instance_id", ""))
    except RegistrationError as exc:
        errors += exc.errors
    if errors:
        raise RegistrationError(errors)
    return ids


def http_routes(registry: Registry, access: Access, ops: Registrations | None = None) -> list[web.RouteDef]:
    store = ops or LocalRegistrations(registry)

    async def register(request: web.Request) -> web.Response:
        token = _token(request)
        access.caller(token)
        reg = RegistrationInput.parse(parse_body(await read_body(request)))
        caller = access.service(token, reg.service)
        return web.json_response(instance_json(await store.register(reg, caller.token_id)))

    def by_id(action: Callable[[str, str], Awaitable[Instance]]) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            token = _token(request)
            access.caller(token)
            service, instance_id = _ids(parse_body(await read_body(request)))
            access.service(token, service)
            return web.json_response(instance_json(await action(service, instance_id)))

        return handle

    async def instances(request: web.Request) -> web.Response:
        access.caller(_token(request))
        service = check_service_filter(request.query.get("service"))
        return web.json_response({"instances": [instance_json(i) for i in await store.listed(service)]})

    return [
        web.post("/v1/register", _guarded(register)),
        web.post("/v1/heartbeat", _guarded(by_id(store.heartbeat))),
        web.post("/v1/deregister", _guarded(by_id(store.deregister))),
        web.get("/v1/instances", _guarded(instances)),
    ]
