"""The seam through which observability watches the protocol. Protocol code calls these hooks;
metrics, traces and status pages implement them. Nothing here imports prometheus."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from xdsd.server.stream import Stream


class StreamObserver(Protocol):
    def stream_opened(self, stream: Stream) -> None: ...
    def stream_closed(self, stream: Stream) -> None: ...
    def stream_refused(self, reason: str, peer: str) -> None: ...
    def response_sent(self, stream: Stream, type_url: str, version: str, size: int, count: int, latency: float) -> None: ...
    def ack(self, stream: Stream, type_url: str, version: str, latency: float | None) -> None: ...
    def nack(self, stream: Stream, type_url: str, version: str, error: str) -> None: ...


class NullObserver:
    def stream_opened(self, stream: Stream) -> None:
        pass

    def stream_closed(self, stream: Stream) -> None:
        pass

    def stream_refused(self, reason: str, peer: str) -> None:
        pass

    def response_sent(self, stream: Stream, type_url: str, version: str, size: int, count: int, latency: float) -> None:
        pass

    def ack(self, stream: Stream, type_url: str, version: str, latency: float | None) -> None:
        pass

    def nack(self, stream: Stream, type_url: str, version: str, error: str) -> None:
        pass


class FanOut:
    """Calls several observers in turn (skipping those that leave a hook as NullObserver's)."""

    def __init__(self, *observers: StreamObserver) -> None:
        self._observers = observers

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        null = getattr(NullObserver, name, None)
        methods = [m for m in (getattr(o, name) for o in self._observers)
                   if null is None or getattr(m, "__func__", None) is not null]
        if len(methods) == 1:
            setattr(self, name, methods[0])
            return methods[0]

        def call(*args: object) -> None:
            for m in methods:
                m(*args)

        setattr(self, name, call)  # built once per hook, not on every call
        return call


class NackObserver(NullObserver):
    """Tells ``on_nack(node_id, canary_group, type_url, error)`` about every NACK (staged rollouts)."""

    def __init__(self, on_nack: Callable[[str, bool, str, str], None]) -> None:
        self._on_nack = on_nack

    def nack(self, stream: Stream, type_url: str, version: str, error: str) -> None:
        group = stream.group
        self._on_nack(stream.node_id, bool(group is not None and group.canary), type_url, error)
