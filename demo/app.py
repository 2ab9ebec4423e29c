"""A tiny demo app for the docker-compose mesh: answers who it is and who called it, and calls its
upstream (through its sidecar's outbound listener) when UPSTREAM is set."""

from __future__ import annotations

import http.server
import json
import os
import random
import urllib.error
import urllib.request

NAME = os.environ.get("APP_NAME", "app")
VERSION = os.environ.get("APP_VERSION", "v1")
UPSTREAM = os.environ.get("UPSTREAM", "")
PORT = int(os.environ.get("APP_PORT", "9080"))
ADDRESS = os.environ.get("APP_ADDRESS", "0.0.0.0")
FAILURE_RATE = [float(os.environ.get("FAILURE_RATE", "0"))]  # settable at run time: GET /__fail?rate=0.3


# Passed on to the upstream: the trace context, and the canary flag the mesh routes on.
TRACE_HEADERS = ("traceparent", "tracestate", "x-request-id", "baggage", "x-canary")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/__fail?rate="):
            FAILURE_RATE[0] = float(self.path.split("=", 1)[1])
            self._send(200, {"failure_rate": FAILURE_RATE[0]})
            return
        if FAILURE_RATE[0] and random.random() < FAILURE_RATE[0]:
            self._send(503, {"service": NAME, "version": VERSION, "injected": "failure"})
            return
        caller = self.headers.get("x-forwarded-client-cert", "")
        body: dict[str, object] = {"service": NAME, "version": VERSION, "path": self.path,
                                   "caller": caller.split("URI=", 1)[-1] if "URI=" in caller else None,
                                   "user": self.headers.get("x-user")}  # a verified JWT's sub (forward_claims)
        status = 200
        if UPSTREAM:
            try:
                # Pass the trace context on, so the sidecars' spans join one trace.
                onward = urllib.request.Request(UPSTREAM + self.path, headers={
                    h: v for h in TRACE_HEADERS if (v := self.headers.get(h)) is not None})
                with urllib.request.urlopen(onward, timeout=3) as resp:
                    body["upstream"] = json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                body["upstream_error"] = f"HTTP {exc.code}"
                status = 502
            except Exception as exc:  # noqa: BLE001 - report, do not crash the demo app
                body["upstream_error"] = str(exc)
                status = 502
        self._send(status, body)

    def _send(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    http.server.ThreadingHTTPServer((ADDRESS, PORT), Handler).serve_forever()
