"""Free TCP ports for real-process tests.

A port is found by binding port 0 on the host it will be used on, so any loopback address works
(127.0.0.2, 127.0.0.3, ... need no root on Linux). Ports handed out once are not handed out again by
this process, so two ``free_port()`` calls in a row never collide even before either port is bound.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

_lock = threading.Lock()
_handed_out: set[tuple[str, int]] = set()


def _check_host(host: str) -> None:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"free_port wants an IP address, got {host!r}") from None
    if addr.version != 4:
        raise ValueError(f"free_port supports IPv4 only, got {host!r}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at ``host`` right now, never returned before by this process."""
    _check_host(host)
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        with _lock:
            # The same port on another loopback address would be fine, but tests often map one
            # port number to one role; keep numbers unique across hosts too.
            if all(p != port for _, p in _handed_out):
                _handed_out.add((host, port))
                return port
    raise RuntimeError(f"no free port found on {host}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_on(*hosts: str) -> int:
    """A port free on every one of ``hosts`` (the mesh port of several loopback "machines", a stats
    port each node binds on its own address), never returned before by this process."""
    if not hosts:
        raise ValueError("free_port_on needs at least one host")
    for host in hosts:
        _check_host(host)
    for _ in range(200):
        port = free_port(hosts[0])
        if all(_bindable(h, port) for h in hosts[1:]):
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports on ``host``."""
    return [free_port(host) for _ in range(n)]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port_open(host: str, port: int, timeout: float = 30.0, what: str | None = None) -> None:
    """Polls until host:port accepts connections; AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or f'{host}:{port}'} to accept connections")
        time.sleep(0.05)
