"""Admin HTTP: /metrics, /healthz, /readyz, /debug/proxies, /debug/config, /debug/loop."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from xdsd.admin.dump import node_config
from xdsd.controller import Controller
from xdsd.observability.loop import LoopMonitor
from xdsd.observability.metrics import Metrics
from xdsd.server.xds import XdsServer


def make_app(server: XdsServer, controller: Controller, metrics: Metrics, is_serving: Callable[[], bool],
             loop_monitor: LoopMonitor | None = None) -> web.Application:
    async def metrics_page(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        # Ready only once a complete valid config is loaded and the xDS port is serving.
        if controller.cache.ready and is_serving():
            return web.json_response({"ready": True, "revision": controller.cache.revision})
        reason = "no valid config loaded yet" if not controller.cache.ready else "xDS server not started"
        return web.json_response({"ready": False, "reason": reason, "config": controller.status.as_json()}, status=503)

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

    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/debug/proxies", proxies)
    app.router.add_get("/debug/config", config)
    app.router.add_get("/debug/refused", refused)
    app.router.add_get("/debug/config_dump", config_dump)
    app.router.add_get("/debug/loop", loop_health)
    return app
