"""Traffic through Envoy: a batch of requests, or steady background traffic that records failures."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class Result:
    at: float
    status: int  # 0: connection failed
    app: str | None


class Client:
    """Keep-alive HTTP/1.1 client that reconnects after errors."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path or "/"
        if parts.query:
            self.path += "?" + parts.query
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def get(self, path: str | None = None, headers: dict[str, str] | None = None) -> Result:
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request("GET", path or self.path, headers=headers or {})
                resp = self._conn.getresponse()
                body = resp.read()
                app = resp.getheader("x-app")
                if app is None and resp.status == 200:
                    try:
                        app = json.loads(body).get("app")
                    except ValueError:
                        app = None
                if resp.getheader("connection", "").lower() == "close":
                    self.close()
                return Result(time.monotonic(), resp.status, app)
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 1:
                    return Result(time.monotonic(), 0, None)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def send_requests(url: str, n: int, headers: dict[str, str] | None = None, timeout: float = 5.0) -> list[Result]:
    client = Client(url, timeout)
    try:
        return [client.get(headers=headers) for _ in range(n)]
    finally:
        client.close()


def share(results: list[Result]) -> dict[str, float]:
    """Fraction of all requests answered by each app (failures count under "HTTP <status>")."""
    counts: Counter[str] = Counter(r.app if r.status == 200 and r.app else f"HTTP {r.status}" for r in results)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in counts.items()}


@dataclass
class SteadyTraffic:
    """Background requests at a steady pace until stopped; every result is kept."""

    url: str
    interval: float = 0.01
    headers: dict[str, str] | None = None
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        client = Client(self.url, timeout=5.0)
        try:
            while not self._stop.is_set():
                self.results.append(client.get(headers=self.headers))
                self._stop.wait(self.interval)
        finally:
            client.close()

    def __enter__(self) -> SteadyTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status != 200]

    def since(self, t: float) -> list[Result]:
        return [r for r in self.results if r.at >= t]
