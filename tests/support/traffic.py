"""Traffic through Envoy: a batch of requests, or steady background traffic that records failures.

Every request gives a ``Result(at, status, app)``: ``status`` 0 means the connection failed (refused,
reset, timed out); ``app`` is the upstream app that answered (``x-app`` header, else the JSON body's
``app``), None when no app did (e.g. Envoy's own 503). A Result unpacks as ``status, app = result``.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

# A reused keep-alive connection that the server closed while idle fails like this before any
# response byte arrives; one retry on a fresh connection is what every HTTP client does then.
_STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                            http.client.BadStatusLine)


@dataclass(frozen=True, slots=True)
class Result:
    at: float  # time.monotonic() when the answer (or the failure) came
    status: int  # 0: connection failed
    app: str | None
    error: str | None = field(default=None, compare=False)  # why status is 0

    def __iter__(self) -> Iterator[Any]:
        """``status, app = result``."""
        return iter((self.status, self.app))

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def app(self) -> str | None:
        return _app_of(self.status, self.headers.get("x-app"), self.body)


def _app_of(status: int, header: str | None, body: bytes) -> str | None:
    if header is not None:
        return header
    if status == 200:
        try:
            data = json.loads(body)
        except ValueError:
            return None
        return data.get("app") if isinstance(data, dict) else None
    return None


class Client:
    """Keep-alive HTTP/1.1 client for one host:port.

    A request on a reused connection that the server had closed is retried once on a fresh
    connection; any other failure (refused, reset mid-request on a fresh connection, timeout) is a
    status-0 Result and the next request reconnects.
    """

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path or "/"
        if parts.query:
            self.path += "?" + parts.query
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._reused = False

    def request(self, method: str = "GET", path: str | None = None, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> Response:
        """One request; raises OSError / HTTPException when the connection fails."""
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                self._reused = False
            reused = self._reused
            try:
                self._conn.request(method, path or self.path, body=body, headers=headers or {})
                resp = self._conn.getresponse()
                data = resp.read()
            except _STALE_CONNECTION_ERRORS:
                self.close()
                if reused and attempt == 0:
                    continue
                raise
            except (OSError, http.client.HTTPException):
                self.close()
                raise
            self._reused = True
            if resp.will_close:
                self.close()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        raise AssertionError("unreachable")

    def get(self, path: str | None = None, headers: dict[str, str] | None = None) -> Result:
        try:
            resp = self.request("GET", path, headers)
        except (OSError, http.client.HTTPException) as exc:
            return Result(time.monotonic(), 0, None, f"{type(exc).__name__}: {exc}")
        return Result(time.monotonic(), resp.status, resp.app)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def http_request(url: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes | None = None,
                 timeout: float = 5.0) -> Response:
    """One request on a fresh connection (raises on connection failure)."""
    with Client(url, timeout) as client:
        return client.request(method, headers=headers, body=body)


def send_requests(url: str, n: int, headers: dict[str, str] | None = None, timeout: float = 5.0) -> list[Result]:
    """``n`` sequential GETs on one keep-alive connection (reconnecting after errors)."""
    with Client(url, timeout) as client:
        return [client.get(headers=headers) for _ in range(n)]


def statuses(results: Iterable[Result]) -> Counter[int]:
    return Counter(r.status for r in results)


def share(results: Iterable[Result]) -> dict[str, float]:
    """Fraction of all requests answered by each app (failures count under "HTTP <status>")."""
    counts: Counter[str] = Counter(r.app if r.status == 200 and r.app else f"HTTP {r.status}" for r in results)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in counts.items()}


@dataclass
class SteadyTraffic:
    """Background GETs at a steady pace until stopped; every Result is kept in ``results``.

    ``with SteadyTraffic(url) as t: ...`` then ``t.failures()``, ``t.since(t0)``, ``t.assert_no_failures()``.
    """

    url: str
    interval: float = 0.01
    headers: dict[str, str] | None = None
    timeout: float = 5.0
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"SteadyTraffic {self.url}", daemon=True)
        self._crash: BaseException | None = None

    def _run(self) -> None:
        client = Client(self.url, timeout=self.timeout)
        try:
            while not self._stop.is_set():
                self.results.append(client.get(headers=self.headers))
                self._stop.wait(self.interval)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self._crash = exc
        finally:
            client.close()

    def start(self) -> SteadyTraffic:
        self._thread.start()
        return self

    def __enter__(self) -> SteadyTraffic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout * 2 + 10)
        if self._crash is not None:
            raise AssertionError(f"SteadyTraffic thread crashed: {self._crash!r}") from self._crash

    def count(self) -> int:
        return len(self.results)

    def wait_for_count(self, n: int, timeout: float = 30.0) -> None:
        """Waits until at least ``n`` more requests than now have completed."""
        from tests.support.procs import wait_for

        target = len(self.results) + n
        wait_for(lambda: len(self.results) >= target, f"{n} more requests to {self.url}", timeout)

    def failures(self) -> list[Result]:
        return [r for r in list(self.results) if r.status != 200]

    def since(self, t: float) -> list[Result]:
        return [r for r in list(self.results) if r.at >= t]

    def summary(self) -> str:
        results = list(self.results)
        fails = [r for r in results if r.status != 200]
        text = f"{len(fails)} of {len(results)} requests to {self.url} failed; statuses {dict(statuses(results))}"
        if fails:
            text += "; first failures: " + ", ".join(
                f"t={r.at - results[0].at:.3f}s status={r.status}{' ' + r.error if r.error else ''}" for r in fails[:5])
        return text

    def assert_no_failures(self, min_requests: int = 1) -> None:
        results = list(self.results)
        assert len(results) >= min_requests, f"only {len(results)} requests (wanted {min_requests}): {self.summary()}"
        assert not self.failures(), self.summary()
