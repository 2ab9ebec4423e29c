"""Admin HTTP: /metrics, /healthz, /readyz, /debug/*, and (added by the App) the registration API.

Every route has an access rule in ``xdsd.auth.methods.ADMIN_ROUTES``; a route without one answers
403. The debug pages need an operator token unless the admin port listens on loopback only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from xdsd.admin.dump import node_config
from xdsd.auth.access import Access, Denied, token_from_headers
from xdsd.auth.methods import ADMIN_ROUTES, Rule, check
from xdsd.controller import Controller
from xdsd.errors import MeshError, StoreUnavailable
from xdsd.model.load import MAX_TEXT_BYTES
from xdsd.observability.loop import LoopMonitor
from xdsd.observability.metrics import Metrics
from xdsd.server.xds import XdsServer
from xdsd.supervise import Supervisor

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SharedMesh(Protocol):
    """The mesh in a shared store (``xdsd serve --store etcd://``), as the admin API sees it."""

    @property
    def base(self) -> int: ...  # the store revision of the mesh served here
    async def apply(self, content: bytes, how: str, allow_removal: bool, base: int | None) -> tuple[int, dict[str, object]]: ...
    def replicas(self) -> dict[str, object]: ...
    async def history(self) -> list[dict[str, object]]: ...  # oldest first, each with its "content" (bytes)


def access_middleware(access: Access, debug_open: bool,
                      on_refused: Callable[[str, str, str, str], None] | None = None) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Enforces ``ADMIN_ROUTES`` before any handler runs. ``debug_open``: the admin address is
    loopback, so the LOCAL_OR_OPERATOR pages need no token."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route
        if isinstance(request.match_info.http_exception, web.HTTPException) or route.resource is None:
            return await handler(request)  # 404 / 405: nothing is served
        method = "GET" if request.method == "HEAD" else request.method
        rule = ADMIN_ROUTES.get((method, route.resource.canonical))
        if rule is None:
            return web.json_response({"errors": [f"no-rule: no access rule for {method} {route.resource.canonical}"]},
                                     status=403)
        if rule is Rule.LOCAL_OR_OPERATOR:
            rule = Rule.PUBLIC if debug_open else Rule.OPERATOR
        try:
            check(access, rule, token_from_headers(request.headers))
        except Denied as exc:
            if on_refused is not None:
                on_refused(exc.reason, exc.message, str(request.remote), f"{method} {request.path}")
            return web.json_response({"errors": [f"{exc.reason}: {exc.message}"]}, status=401 if exc.unauthenticated else 403)
        return await handler(request)

    return middleware


def make_app(server: XdsServer, controller: Controller, metrics: Metrics, is_serving: Callable[[], bool],
             loop_monitor: LoopMonitor | None = None, *, access: Access | None = None, debug_open: bool = True,
             supervisor: Supervisor | None = None, shared: SharedMesh | None = None) -> web.Application:
    """``shared``: the mesh lives in a shared store (etcd): apply writes there, replicas are listed."""
    async def metrics_page(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        # Ready once a complete valid config is loaded and the xDS port is serving, while no
        # background task has been failing for long (a dead watcher or rotator is not "ready").
        failing = supervisor.unhealthy() if supervisor is not None else []
        if controller.cache.ready and is_serving() and not failing:
            return web.json_response({"ready": True, "revision": controller.cache.revision})
        if not controller.cache.ready:
            reason = "no valid config loaded yet"
            if shared is not None:
                reason += " (waiting for the mesh from etcd)"
        elif not is_serving():
            reason = "xDS server not started"
        else:
            reason = "background task failing: " + ", ".join(failing)
        return web.json_response({"ready": False, "reason": reason, "failing": failing,
                                  "config": controller.status.as_json()}, status=503)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"tasks": supervisor.status() if supervisor is not None else [],
                                  "failing": supervisor.unhealthy() if supervisor is not None else []})

    async def proxies(_: web.Request) -> web.Response:
        # Each node's protocol state, plus what the mesh side knows: the revision being served and,
        # if the latest edit was refused, why (so "why did my change not arrive?" has an answer).
        status = controller.status
        nodes = server.status()
        for node in nodes:
            node["config_revision"] = status.revision
            node["config_error"] = status.last_error or None
        return web.json_response(nodes)

    async def config_dump(request: web.Request) -> web.Response:
        node_id = request.query.get("node", "")
        if not node_id:
            return web.json_response({"error": "query parameter 'node' is required"}, status=400)
        dump = node_config(server, node_id)
        if dump is None:
            return web.json_response({"error": f"node {node_id!r} is not connected"}, status=404)
        return web.json_response(dump)

    async def refused(_: web.Request) -> web.Response:
        return web.json_response(list(server.refusals))

    async def config(_: web.Request) -> web.Response:
        return web.json_response(controller.status.as_json())

    async def loop_health(request: web.Request) -> web.Response:
        # The longest event-loop stall since the last ``?reset=1`` (benchmarks read it per scenario).
        if loop_monitor is None:
            return web.json_response({"error": "no loop monitor"}, status=404)
        if request.query.get("reset") == "1":
            return web.json_response(loop_monitor.reset())
        return web.json_response({"max_stall_seconds": loop_monitor.max_stall, "since": loop_monitor.since})

    async def candidate(request: web.Request) -> bytes | web.Response:
        """The request body, a mesh file: at most MAX_TEXT_BYTES, read no further."""
        if request.content_length is not None and request.content_length > MAX_TEXT_BYTES:
            return web.json_response({"errors": [f"body: larger than {MAX_TEXT_BYTES} bytes"]}, status=413)
        body = bytearray()
        while chunk := await request.content.read(1 << 16):
            body += chunk
            if len(body) > MAX_TEXT_BYTES:
                return web.json_response({"errors": [f"body: larger than {MAX_TEXT_BYTES} bytes"]}, status=413)
        return bytes(body)

    async def config_diff(request: web.Request) -> web.Response:
        content = await candidate(request)
        if isinstance(content, web.Response):
            return content
        try:
            report = await controller.diff_off_loop(content)  # validation and generation off the loop
        except MeshError as exc:
            return web.json_response({"valid": False, "errors": [str(e) for e in exc.errors]}, status=400)
        if shared is not None:
            report["base"] = shared.base  # what `xdsd apply` swaps against
        return web.json_response(report)

    async def config_apply(request: web.Request) -> web.Response:
        content = await candidate(request)
        if isinstance(content, web.Response):
            return content
        allow_removal = request.query.get("allow_removal") in ("1", "true")
        if shared is not None:
            base = request.query.get("base")
            if base is not None and not base.isdigit():
                return web.json_response({"errors": ["base: must be an etcd revision number"]}, status=400)
            try:
                status, out = await shared.apply(content, "apply", allow_removal, int(base) if base is not None else None)
            except StoreUnavailable as exc:
                return web.json_response({"result": "unavailable", "errors": [f"not stored: {exc}"]}, status=503,
                                         headers={"Retry-After": "1"})
            return web.json_response(out, status=status)
        out = controller.apply_content(content, "apply", allow_removal)
        return web.json_response(out, status=400 if out["result"] == "rejected" else 200)

    async def shared_history() -> list[dict[str, object]] | web.Response:
        assert shared is not None
        try:
            return await shared.history()
        except StoreUnavailable as exc:
            return web.json_response({"errors": [f"history: {exc}"]}, status=503, headers={"Retry-After": "1"})

    async def config_history(_: web.Request) -> web.Response:
        if shared is not None:
            entries = await shared_history()
            if isinstance(entries, web.Response):
                return entries
            return web.json_response({"current": shared.base, "revisions": [
                {k: v for k, v in e.items() if k != "content"} for e in entries]})
        history = controller.history
        entries = [e.as_json() for e in history.entries] if history is not None else []
        return web.json_response({"current": controller.status.history_revision, "revisions": entries})

    async def config_history_one(request: web.Request) -> web.Response:
        text = request.match_info["revision"]
        if shared is not None:
            entries = await shared_history()
            if isinstance(entries, web.Response):
                return entries
            match = [e for e in entries if str(e["revision"]) == text]
            if not match:
                return web.json_response({"errors": [f"revision: no revision {text[:20]!r} in the history"]}, status=404)
            return web.json_response({**match[0], "content": match[0]["content"].decode("utf-8", "replace")})  # type: ignore[attr-defined]
        found = controller.history.get(int(text)) if controller.history is not None and text.isdigit() else None
        if found is None:
            return web.json_response({"errors": [f"revision: no revision {text[:20]!r} in the history"]}, status=404)
        entry, content = found
        return web.json_response({**entry.as_json(), "content": content.decode("utf-8", "replace")})

    async def shared_rollback(to: int | None) -> web.Response:
        """Make an earlier revision kept in etcd the mesh again (through etcd, like an apply)."""
        assert shared is not None
        entries = await shared_history()
        if isinstance(entries, web.Response):
            return entries
        older = [e for e in entries if int(e["revision"]) < shared.base]  # type: ignore[call-overload]
        found = next((e for e in entries if e["revision"] == to), None) if to is not None else (older[-1] if older else None)
        if found is None:
            known = ", ".join(str(e["revision"]) for e in entries) or "none"
            return web.json_response({"result": "rejected", "errors": [
                f"no revision {to if to is not None else 'before the current one'} in the history (kept: {known})"]},
                status=400)
        try:
            status, out = await shared.apply(found["content"], f"rollback to {found['revision']}", True, None)  # type: ignore[arg-type]
        except StoreUnavailable as exc:
            return web.json_response({"result": "unavailable", "errors": [f"not stored: {exc}"]}, status=503,
                                     headers={"Retry-After": "1"})
        out["to"] = found["revision"]
        return web.json_response(out, status=status)

    async def config_rollback(request: web.Request) -> web.Response:
        to = request.query.get("to")
        if to is not None and not to.isdigit():
            return web.json_response({"errors": ["to: must be a revision number"]}, status=400)
        if shared is not None:
            return await shared_rollback(int(to) if to is not None else None)
        out = controller.rollback(int(to) if to is not None else None)
        return web.json_response(out, status=400 if out["result"] == "rejected" else 200)

    async def replicas(_: web.Request) -> web.Response:
        if shared is None:
            here = sorted(n for nodes in server.clusters().values() for n in nodes)
            return web.json_response({"store": "file", "replicas": [{"id": "local", "self": True, "proxies": here}]})
        return web.json_response(shared.replicas())

    middlewares = [access_middleware(access or Access.off(), debug_open, server.refused)]
    # Bodies are read by their handlers, each with its own limit (registration 64 KiB, configs 32 MiB).
    app = web.Application(middlewares=middlewares, client_max_size=MAX_TEXT_BYTES + 1)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/debug/proxies", proxies)
    app.router.add_get("/debug/config", config)
    app.router.add_get("/debug/refused", refused)
    app.router.add_get("/debug/config_dump", config_dump)
    app.router.add_get("/debug/loop", loop_health)
    app.router.add_get("/debug/health", health)
    app.router.add_get("/debug/replicas", replicas)
    app.router.add_post("/v1/config/diff", config_diff)
    app.router.add_post("/v1/config/apply", config_apply)
    app.router.add_get("/v1/config/history", config_history)
    app.router.add_get("/v1/config/history/{revision}", config_history_one)
    app.router.add_post("/v1/config/rollback", config_rollback)
    return app
