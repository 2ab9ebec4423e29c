"""An HTTP/2 frame tap: a TCP proxy that counts the frames going each way, to see what a client's
HTTP/2 habits cost the server (issue 19, item 2).

    tap = FrameTap(upstream_port)           # a child process, pinned to ``cpus`` if given
    ... point clients at tap.port ...
    counts = tap.take()                     # frames since the last take, then reset

Counted per direction (``c2s``: client to server, ``s2c``): frames by type, bytes by type, PINGs
and SETTINGS with and without ACK, WINDOW_UPDATEs on the connection and on streams (with the sum
of their increments), HEADERS with END_STREAM (trailers), DATA with END_STREAM, empty DATA. The
first SETTINGS of each side and the header names (and values, but tokens) of the first request and
response are decoded (HPACK) and kept as examples. Cleartext only (prior knowledge, as the
benchmarks use). The tap adds a hop: use it to count frames, never to time anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import struct
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

import hpack

from tests.support.procs import free_port

TYPES = {0: "DATA", 1: "HEADERS", 2: "PRIORITY", 3: "RST_STREAM", 4: "SETTINGS", 5: "PUSH_PROMISE", 6: "PING",
         7: "GOAWAY", 8: "WINDOW_UPDATE", 9: "CONTINUATION"}
SETTINGS = {1: "HEADER_TABLE_SIZE", 2: "ENABLE_PUSH", 3: "MAX_CONCURRENT_STREAMS", 4: "INITIAL_WINDOW_SIZE",
            5: "MAX_FRAME_SIZE", 6: "MAX_HEADER_LIST_SIZE", 8: "ENABLE_CONNECT_PROTOCOL"}
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SECRET_HEADERS = {b"x-xdsd-token", b"authorization"}


class Stats:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, Any] = {}

    def take(self) -> dict[str, Any]:
        out = {"counts": dict(self.counts), "examples": self.examples}
        self.counts = Counter()
        return out


class _Direction:
    """Parses one direction's frames as bytes pass (a frame may span reads)."""

    def __init__(self, name: str, stats: Stats, preface: bool) -> None:
        self.name = name
        self.stats = stats
        self.skip = len(PREFACE) if preface else 0
        self.buf = bytearray()
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = 1 << 20
        self.block = bytearray()  # a header block waiting for its CONTINUATION frames
        self.headers_seen = 0
        self.settings_seen = False

    def feed(self, data: bytes) -> None:
        if self.skip:
            step = min(self.skip, len(data))
            data = data[step:]
            self.skip -= step
        self.buf += data
        buf = self.buf
        pos = 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos:pos + 3], "big")
            if len(buf) - pos < 9 + length:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            self._frame(kind, flags, sid, bytes(buf[pos + 9:pos + 9 + length]))
            pos += 9 + length
        del buf[:pos]

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        c = self.stats.counts
        d = self.name
        name = TYPES.get(kind, f"type{kind}")
        c[f"{d} {name}"] += 1
        c[f"{d} {name} bytes"] += len(payload) + 9
        c[f"{d} bytes"] += len(payload) + 9
        c[f"{d} frames"] += 1
        if kind == 0:  # DATA
            if flags & 0x1:
                c[f"{d} DATA END_STREAM"] += 1
            if not payload:
                c[f"{d} DATA empty"] += 1
        elif kind == 6:  # PING
            c[f"{d} PING {'ACK' if flags & 0x1 else 'request'}"] += 1
        elif kind == 4:  # SETTINGS
            if flags & 0x1:
                c[f"{d} SETTINGS ACK"] += 1
            else:
                c[f"{d} SETTINGS values"] += 1
                if not self.settings_seen:
                    self.settings_seen = True
                    values = {SETTINGS.get(k, str(k)): v for k, v in
                              (struct.unpack_from(">HI", payload, i) for i in range(0, len(payload) - 5, 6))}
                    self.stats.examples.setdefault(f"{d} first SETTINGS", values)
        elif kind == 8:  # WINDOW_UPDATE
            inc = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            where = "connection" if sid == 0 else "stream"
            c[f"{d} WINDOW_UPDATE {where}"] += 1
            c[f"{d} WINDOW_UPDATE {where} increment"] += inc
        elif kind in (1, 9):  # HEADERS, CONTINUATION
            if kind == 1:
                if flags & 0x1:
                    c[f"{d} HEADERS END_STREAM"] += 1
                if flags & 0x8:  # PADDED
                    payload = payload[1:len(payload) - payload[0]]
                if flags & 0x20:  # PRIORITY
                    payload = payload[5:]
                self.block = bytearray(payload)
            else:
                self.block += payload
            if flags & 0x4:  # END_HEADERS: decode (keeps the HPACK table in step)
                try:
                    headers = self.decoder.decode(bytes(self.block), raw=True)
                except Exception as exc:  # noqa: BLE001 - counting only
                    c[f"{d} HEADERS undecodable"] += 1
                    self.stats.examples.setdefault(f"{d} HEADERS error", repr(exc))
                    return
                self.headers_seen += 1
                if self.headers_seen <= 2:
                    shown = [(k.decode("latin-1"), "<redacted>" if k in SECRET_HEADERS else v.decode("latin-1")[:80])
                             for k, v in headers]
                    self.stats.examples.setdefault(f"{d} HEADERS #{self.headers_seen}", shown)
        elif kind == 3:
            c[f"{d} RST_STREAM code {int.from_bytes(payload[:4], 'big')}"] += 1
        elif kind == 7:
            c[f"{d} GOAWAY code {int.from_bytes(payload[4:8], 'big')}"] += 1


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, parse: _Direction) -> None:
    try:
        while data := await reader.read(1 << 16):
            parse.feed(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(conn: Connection, port: int, upstream: tuple[str, int]) -> None:
    stats = Stats()
    connections = 0

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        stats.counts["connections"] += 1
        try:
            ureader, uwriter = await asyncio.open_connection(*upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, uwriter, _Direction("c2s", stats, True)),
                             _pipe(ureader, writer, _Direction("s2c", stats, False)))

    server = await asyncio.start_server(accept, "127.0.0.1", port, backlog=4096)
    loop = asyncio.get_running_loop()
    conn.send("ready")
    async with server:
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd == "take":
                conn.send(stats.take())
            elif cmd == "stop":
                conn.send(None)
                return


def _main(conn: Connection, port: int, upstream: tuple[str, int], cpus: frozenset[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    from bench.loadgen import raise_fd_limit

    raise_fd_limit()
    asyncio.run(_serve(conn, port, upstream))


class FrameTap:
    """The tap in a child process: listens on ``port`` (127.0.0.1), forwards to ``upstream``."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", cpus: frozenset[int] | None = None) -> None:
        self.port = free_port()
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_main, args=(child, self.port, (upstream_host, upstream_port), cpus), daemon=True)
        self._proc.start()
        if not self._conn.poll(30) or self._conn.recv() != "ready":
            raise RuntimeError("the frame tap did not start")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def take(self) -> dict[str, Any]:
        self._conn.send("take")
        return dict(self._conn.recv())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.send("stop")
            self._conn.recv()
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()

    def __enter__(self) -> FrameTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def per(counts: dict[str, int], divisor: float, prefix: str = "") -> dict[str, float]:
    """Counts divided by ``divisor`` (e.g. frames per stream per change), those starting with ``prefix``."""
    return {k: round(v / divisor, 3) for k, v in sorted(counts.items()) if k.startswith(prefix) and v}
