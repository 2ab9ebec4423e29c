"""Each hook of xdsd/transport/compat.py on h2, hpack and hyperframe internals still holds with the
installed versions: the private names exist with the shapes we call, and the behaviour we rely on
happens (checked in memory, h2 connection against h2 connection, no sockets).

A failure names the hook (a key of ``compat.HOOKS``) and the installed and tested versions. After
upgrading one of the packages: fix the hook in compat.py, then move ``compat.TESTED`` and the pins in
pyproject.toml together."""

from __future__ import annotations

import functools
import inspect
import re
import tomllib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.windows
import hpack
import pytest
from hyperframe.frame import Frame, GoAwayFrame, SettingsFrame, WindowUpdateFrame

try:
    from xdsd.transport import compat
except Exception as exc:  # name the versions even when the hooks cannot be defined at all
    found = {}
    for _name in ("h2", "hpack", "hyperframe"):
        try:
            found[_name] = metadata.version(_name)
        except metadata.PackageNotFoundError:
            found[_name] = "not installed"
    raise ImportError(f"xdsd.transport.compat cannot be imported with {found}: {exc}") from exc

F = TypeVar("F", bound=Callable[..., Any])
_CHECKED: set[str] = set()

SERVER = h2.config.H2Configuration(client_side=False, header_encoding=None)
CLIENT = h2.config.H2Configuration(client_side=True, header_encoding=None)
REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/t.Test/Echo"),
           (b":authority", b"localhost"), (b"content-type", b"application/grpc")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
Codes = h2.settings.SettingCodes


def hook(name: str) -> Callable[[F], F]:
    """The test checks compat hook ``name``: any failure in it is reported as that hook's, with the
    versions installed and tested."""
    assert name in compat.HOOKS, f"unknown compat hook {name!r}"

    def wrap(test: F) -> F:
        _CHECKED.add(name)

        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return test(*args, **kwargs)
            except Exception as exc:  # AssertionError included
                pytest.fail(f"compat hook {name!r} ({compat.HOOKS[name]}) no longer holds: "
                            f"{type(exc).__name__}: {exc}\n{compat.describe_versions()}; "
                            f"see xdsd/transport/compat.py")

        return run  # type: ignore[return-value]

    return wrap


def params(fn: Callable[..., Any]) -> list[tuple[str, Any]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def frames(data: bytes) -> list[Frame]:
    """The frames in what an h2 connection sent (no client preface)."""
    out = []
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        frame, length = Frame.parse_frame_header(view[pos:pos + 9])
        frame.parse_body(view[pos + 9:pos + 9 + length])
        out.append(frame)
        pos += 9 + length
    assert pos == len(data), "a frame cut short"
    return out


class Pair:
    """A server connection (ours, built with compat) and an h2 client, bytes passed by hand."""

    def __init__(self, *, max_closed_streams: int = 1024, receive_window: int = 65_535,
                 server_class: type[h2.connection.H2Connection] | None = None,
                 setup: Callable[[h2.connection.H2Connection], None] | None = None) -> None:
        cls = server_class or compat.server_connection_class(max_closed_streams=max_closed_streams,
                                                             receive_window=receive_window)
        self.server = cls(config=SERVER)
        if setup is not None:
            setup(self.server)
        self.server.initiate_connection()
        self.client = h2.connection.H2Connection(config=CLIENT)
        self.client.initiate_connection()

    def to_server(self) -> list[h2.events.Event]:
        return self.server.receive_data(self.client.data_to_send())

    def to_client(self) -> list[h2.events.Event]:
        return self.client.receive_data(self.server.data_to_send())

    def handshake(self) -> None:
        self.to_server()
        self.to_client()
        self.to_server()


def with_size_updates(headers_frame: bytes, updates: bytes) -> bytes:
    """A HEADERS frame (END_HEADERS, no padding or priority) with HPACK table size updates put first."""
    length = int.from_bytes(headers_frame[:3], "big") + len(updates)
    return length.to_bytes(3, "big") + headers_frame[3:9] + updates + headers_frame[9:]


# Size 0 (a fresh encoder's table is empty: nothing is lost), then 4096: two dynamic table size updates.
TWO_UPDATES = b"\x20\x3f\xe1\x1f"


# -- the list of hooks, the versions, the pins ---------------------------------------------------------


def test_every_hook_is_checked() -> None:
    assert _CHECKED == set(compat.HOOKS), (
        f"hooks without a check: {sorted(set(compat.HOOKS) - _CHECKED)}; "
        f"checks of no hook: {sorted(_CHECKED - set(compat.HOOKS))}")


def test_the_installed_versions_are_the_tested_minor_versions() -> None:
    installed = compat.installed()
    for name, tested in compat.TESTED.items():
        assert installed[name].split(".")[:2] == tested.split(".")[:2], (
            f"{name} {installed[name]} is installed, the compat hooks were checked with {tested}: run "
            f"this test module, fix xdsd/transport/compat.py, then move compat.TESTED and the pins in "
            f"pyproject.toml ({compat.describe_versions()})")


def test_pyproject_pins_the_tested_minor_versions() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    deps = {re.split(r"[<>=!~ \[;]", dep, maxsplit=1)[0].lower(): dep.replace(" ", "")
            for dep in pyproject["project"]["dependencies"]}
    for name, tested in compat.TESTED.items():
        major, minor = (int(part) for part in tested.split(".")[:2])
        assert deps.get(name) == f"{name}>={major}.{minor},<{major}.{minor + 1}", (
            f"pyproject.toml must pin {name} to the minor version compat.TESTED names ({tested}): "
            f"found {deps.get(name)!r}")


# -- h2.connection.H2Connection ------------------------------------------------------------------


@hook("closed-streams")
def test_a_connection_forgets_closed_streams_beyond_max_closed_streams() -> None:
    assert isinstance(h2.connection.H2Connection.MAX_CLOSED_STREAMS, int), "no class constant MAX_CLOSED_STREAMS"

    def run(pair: Pair) -> int:
        pair.handshake()
        for sid in range(1, 41, 2):
            pair.client.send_headers(sid, REQUEST, end_stream=True)
            (event, *_) = pair.to_server()
            assert isinstance(event, h2.events.RequestReceived), event
            pair.server.send_headers(sid, RESPONSE, end_stream=True)
            pair.to_client()
        assert hasattr(pair.server, "_closed_streams"), "H2Connection._closed_streams is gone"
        return len(pair.server._closed_streams)

    ours = run(Pair(max_closed_streams=8))
    assert 0 < ours <= 8, f"remembers {ours} closed streams, MAX_CLOSED_STREAMS is 8"
    stock = run(Pair(server_class=h2.connection.H2Connection))
    assert stock > 8, f"the stock connection remembers only {stock} of 19 closed streams: the check proves nothing"


@hook("held-window")
def test_the_connection_window_is_reopened_only_by_the_transport() -> None:
    assert params(h2.windows.WindowManager.__init__) == [("self", inspect.Parameter.empty),
                                                         ("max_window_size", inspect.Parameter.empty)]
    assert params(h2.windows.WindowManager.process_bytes) == [("self", inspect.Parameter.empty),
                                                              ("size", inspect.Parameter.empty)]
    stock = h2.connection.H2Connection(config=SERVER)
    manager = getattr(stock, "_inbound_flow_control_window_manager", None)
    assert isinstance(manager, h2.windows.WindowManager), \
        f"H2Connection._inbound_flow_control_window_manager is {manager!r}"

    def data_on_a_closed_stream(pair: Pair) -> list[Frame]:
        """40,000 bytes of DATA on a stream the server reset: h2 drops them and answers RST_STREAM."""
        pair.handshake()
        pair.client.send_headers(1, REQUEST)
        pair.to_server()
        pair.server.reset_stream(1, h2.errors.ErrorCodes.NO_ERROR)
        pair.server.data_to_send()  # the client does not hear of it before it sends
        for _ in range(4):
            pair.client.send_data(1, b"x" * 10_000)
        pair.to_server()
        return frames(pair.server.data_to_send())

    updates = [f for f in data_on_a_closed_stream(Pair(server_class=h2.connection.H2Connection))
               if isinstance(f, WindowUpdateFrame) and f.stream_id == 0]
    assert updates, "stock h2 no longer reopens the window for DATA on closed streams: is the hook still needed?"

    pair = Pair(receive_window=65_535)
    assert pair.server.inbound_flow_control_window == 65_535
    sent = data_on_a_closed_stream(pair)
    assert not [f for f in sent if isinstance(f, WindowUpdateFrame) and f.stream_id == 0], \
        "h2 reopened the held connection window by itself"
    assert pair.server.inbound_flow_control_window == 65_535 - 40_000
    pair.server.increment_flow_control_window(5_000)
    assert pair.server.inbound_flow_control_window == 65_535 - 35_000, "window_opened not counted"
    assert [f.window_increment for f in frames(pair.server.data_to_send())
            if isinstance(f, WindowUpdateFrame) and f.stream_id == 0] == [5_000]


@hook("local-settings")
def test_replaced_local_settings_are_in_effect_before_the_client_acknowledges_them() -> None:
    values = {Codes.MAX_CONCURRENT_STREAMS: 7, Codes.INITIAL_WINDOW_SIZE: 1000, Codes.MAX_HEADER_LIST_SIZE: 4000}
    pair = Pair(setup=lambda conn: compat.replace_local_settings(conn, values))
    server = pair.server
    assert (server.local_settings.max_concurrent_streams, server.local_settings.initial_window_size,
            server.local_settings.max_header_list_size) == (7, 1000, 4000)
    (settings,) = frames(server.data_to_send())
    assert isinstance(settings, SettingsFrame)
    assert {Codes(k): v for k, v in settings.settings.items() if k in values} == values, settings.settings
    # The client has not seen our SETTINGS: it sends as if the windows were 65,535 bytes.
    pair.client.send_headers(1, REQUEST)
    pair.client.send_data(1, b"x" * 1000)
    events = pair.to_server()
    assert [len(e.data) for e in events if isinstance(e, h2.events.DataReceived)] == [1000]
    pair.client.send_headers(3, REQUEST)
    pair.client.send_data(3, b"x" * 1001)
    with pytest.raises(h2.exceptions.FlowControlError):
        pair.to_server()
    # Acknowledged later, they change nothing (h2 then leaves the decoder's limits alone).
    pair = Pair(setup=lambda conn: compat.replace_local_settings(conn, values))
    pair.to_server()
    pair.to_client()  # the client acknowledges our SETTINGS
    acked = [e for e in pair.to_server() if isinstance(e, h2.events.SettingsAcknowledged)]
    assert len(acked) == 1 and acked[0].changed_settings == {}, acked


# -- hpack: the encoder ------------------------------------------------------------------------------


@hook("encoder-table-size")
def test_the_encoder_table_size_is_capped() -> None:
    prop = inspect.getattr_static(hpack.Encoder, "header_table_size")
    assert isinstance(prop, property) and prop.fset is not None, f"hpack.Encoder.header_table_size is {prop!r}"
    assert isinstance(hpack.Encoder().header_table.maxsize, int)
    encoder = compat.CappedEncoder(100)
    encoder.header_table_size = 1 << 20
    assert encoder.header_table_size == 100 and encoder.header_table.maxsize == 100
    block = encoder.encode([(b"x-a", b"1")])
    assert block[0] & 0xE0 == 0x20, "no dynamic table size update queued for the peer"
    decoder = hpack.Decoder()
    assert decoder.decode(block, raw=True) == [(b"x-a", b"1")]
    for i in range(20):
        headers = [(b"x-%d" % i, b"v" * 30)]
        assert decoder.decode(encoder.encode(headers), raw=True) == headers
        assert sum(32 + len(n) + len(v) for n, v in encoder.header_table.dynamic_entries) <= 100
    encoder.header_table_size = 50  # below the cap: as asked
    assert encoder.header_table_size == 50


@hook("encoder")
def test_h2_encodes_with_the_installed_encoder_within_the_cap() -> None:
    pair = Pair(setup=lambda conn: compat.install_encoder(conn, 4096))
    encoder = pair.server.encoder
    assert isinstance(encoder, compat.CappedEncoder)
    pair.client.update_settings({Codes.HEADER_TABLE_SIZE: 1 << 24})
    pair.handshake()
    assert pair.server.encoder is encoder
    assert encoder.header_table_size == 4096, "the client's SETTINGS_HEADER_TABLE_SIZE went past the cap"
    for i in range(25):
        sid = 2 * i + 1
        pair.client.send_headers(sid, REQUEST, end_stream=True)
        pair.to_server()
        value = b"%d-" % i + b"v" * 500
        pair.server.send_headers(sid, [*RESPONSE, (b"grpc-message", value)], end_stream=True)
        (response, *_) = pair.to_client()
        assert dict(response.headers)[b"grpc-message"] == value
    table = encoder.header_table
    assert table.dynamic_entries, "h2 did not encode with the installed encoder"
    assert sum(32 + len(n) + len(v) for n, v in table.dynamic_entries) <= 4096
    # A client allowing less than the cap gets less (h2 sets it; the encoder tells the client).
    pair.client.update_settings({Codes.HEADER_TABLE_SIZE: 0})
    pair.to_server()
    pair.to_client()
    assert encoder.header_table_size == 0
    pair.client.send_headers(101, REQUEST, end_stream=True)
    pair.to_server()
    pair.server.send_headers(101, RESPONSE, end_stream=True)
    assert any(isinstance(e, h2.events.ResponseReceived) for e in pair.to_client())


# -- hpack: the decoder --------------------------------------------------------------------------------


@hook("decoder-size-updates")
def test_the_decoder_refuses_a_third_size_update() -> None:
    assert params(hpack.Decoder._update_encoding_context) == [("self", inspect.Parameter.empty),
                                                               ("data", inspect.Parameter.empty)]
    assert params(hpack.Decoder.decode) == [("self", inspect.Parameter.empty), ("data", inspect.Parameter.empty),
                                            ("raw", False)]
    block = hpack.Encoder().encode([(b"x-a", b"1")])

    class Counting(compat.LimitedDecoder):
        calls = 0

        def _update_encoding_context(self, data: bytes | memoryview) -> int:
            Counting.calls += 1
            return super()._update_encoding_context(data)

    decoder = Counting(65_536)
    assert decoder.decode(TWO_UPDATES + block, raw=True) == [(b"x-a", b"1")]
    assert Counting.calls == 2, f"_update_encoding_context called {Counting.calls} times for 2 size updates"
    decoder = compat.LimitedDecoder(65_536)
    for _ in range(3):  # the count starts again with each header block
        assert decoder.decode(TWO_UPDATES, raw=True) == []
    with pytest.raises(hpack.HPACKDecodingError, match="more than two"):
        compat.LimitedDecoder(65_536).decode(b"\x20" + TWO_UPDATES + block, raw=True)


@hook("decoder")
def test_h2_decodes_with_the_installed_decoder() -> None:
    def setup(conn: h2.connection.H2Connection) -> None:
        compat.install_decoder(conn, 4000)

    for updates, ok in ((TWO_UPDATES, True), (b"\x20" + TWO_UPDATES, False)):
        pair = Pair(setup=setup)
        assert isinstance(pair.server.decoder, compat.LimitedDecoder)
        assert pair.server.decoder.max_header_list_size == 4000
        pair.handshake()
        pair.server.data_to_send()
        pair.client.send_headers(1, REQUEST, end_stream=True)
        raw = with_size_updates(pair.client.data_to_send(), updates)
        if ok:
            assert any(isinstance(e, h2.events.RequestReceived) for e in pair.server.receive_data(raw))
            continue
        with pytest.raises(h2.exceptions.ProtocolError):
            pair.server.receive_data(raw)
        (goaway,) = [f for f in frames(pair.server.data_to_send()) if isinstance(f, GoAwayFrame)]
        assert goaway.error_code in (h2.errors.ErrorCodes.PROTOCOL_ERROR, h2.errors.ErrorCodes.COMPRESSION_ERROR)
    # The header list limit it was given (h2 announces it, the decoder enforces it).
    pair = Pair(setup=setup)
    pair.handshake()
    pair.server.data_to_send()
    pair.client.send_headers(1, [*REQUEST, (b"x-big", b"v" * 5000)], end_stream=True)
    with pytest.raises(h2.exceptions.ProtocolError):
        pair.to_server()
    (goaway,) = [f for f in frames(pair.server.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


# -- GOAWAY ----------------------------------------------------------------------------------------------


@hook("goaway")
def test_goaway_bytes_are_a_goaway_frame_and_h2_keeps_serving_the_open_streams() -> None:
    raw = compat.goaway(7, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
    (frame,) = frames(raw)
    assert isinstance(frame, GoAwayFrame), frame
    assert (frame.stream_id, frame.last_stream_id, frame.error_code) == (0, 7, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
    (frame,) = frames(compat.goaway(3))
    assert isinstance(frame, GoAwayFrame) and frame.error_code == h2.errors.ErrorCodes.NO_ERROR
    # Written past h2: the client hears it, the server's h2 runs the open stream to its end.
    pair = Pair()
    pair.handshake()
    pair.client.send_headers(1, REQUEST, end_stream=True)
    pair.to_server()
    pair.to_client()
    terminated = [e for e in pair.client.receive_data(compat.goaway(pair.server.highest_inbound_stream_id))
                  if isinstance(e, h2.events.ConnectionTerminated)]
    assert len(terminated) == 1 and terminated[0].last_stream_id == 1, terminated
    assert terminated[0].error_code == h2.errors.ErrorCodes.NO_ERROR
    pair.server.send_headers(1, RESPONSE)
    pair.server.send_data(1, b"\0\0\0\0\0", end_stream=True)
    assert [type(f).__name__ for f in frames(pair.server.data_to_send())] == ["HeadersFrame", "DataFrame"]


@hook("protocol-error-goaway")
def test_a_protocol_error_leaves_a_goaway_to_send() -> None:
    pair = Pair()
    pair.handshake()
    pair.server.data_to_send()
    data_on_stream_zero = b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"
    with pytest.raises(h2.exceptions.ProtocolError):
        pair.server.receive_data(data_on_stream_zero)
    (goaway,) = [f for f in frames(pair.server.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


@hook("control-frames")
def test_window_updates_applied_directly_match_h2s_own() -> None:
    """``compat.window_update`` changes the same windows h2 reads when it sends, as h2 itself does
    for the frame; and leaves to h2 every frame it must judge."""

    def opened() -> Pair:
        pair = Pair()
        pair.handshake()
        assert not compat.control_ready(pair.server), "ready before the client's first request"
        pair.client.send_headers(1, REQUEST)
        pair.to_server()
        pair.server.send_headers(1, RESPONSE)
        assert compat.control_ready(pair.server)
        return pair

    direct, stock = opened(), opened()
    for sid, increment in ((1, 1000), (0, 5000), (1, 1)):
        assert compat.window_update(direct.server, sid, increment)
        stock.client.increment_flow_control_window(increment, stream_id=sid or None)
        stock.to_server()
        assert direct.server.local_flow_control_window(1) == stock.server.local_flow_control_window(1)
        assert direct.server.outbound_flow_control_window == stock.server.outbound_flow_control_window
    window = direct.server.local_flow_control_window(1)
    while window:  # the whole window can be sent, no more
        size = min(window, direct.server.max_outbound_frame_size)
        direct.server.send_data(1, b"x" * size)
        window -= size
    assert direct.server.local_flow_control_window(1) == 0

    pair = opened()
    before = (pair.server.outbound_flow_control_window, pair.server.local_flow_control_window(1))
    assert not compat.window_update(pair.server, 1, 0)  # h2 answers PROTOCOL_ERROR
    assert not compat.window_update(pair.server, 0, 2**31)  # past 2^31-1: FLOW_CONTROL_ERROR
    assert not compat.window_update(pair.server, 1, 2**31 - 1)
    assert not compat.window_update(pair.server, 3, 10)  # no such stream
    pair.server.end_stream(1)
    pair.client.end_stream(1)
    pair.to_server()  # stream 1 closed
    assert not compat.window_update(pair.server, 1, 10)
    assert (pair.server.outbound_flow_control_window, 65_535) == (before[0], 65_535)


def _open_call() -> Pair:
    pair = Pair()
    pair.handshake()
    pair.client.send_headers(1, REQUEST)
    pair.to_server()
    pair.server.send_headers(1, RESPONSE)
    pair.to_client()
    assert compat.control_ready(pair.server)
    return pair


def _windows(conn: h2.connection.H2Connection, sid: int) -> tuple[int, int]:
    return conn.inbound_flow_control_window, conn._get_stream_by_id(sid).inbound_flow_control_window


@hook("data-in")
def test_data_received_directly_shrinks_the_windows_h2_would() -> None:
    """``compat.receive_data`` leaves h2 in the state h2's own handling of the frame leaves it:
    the same receive windows, the stream still open (h2 takes the END_STREAM that follows), and
    it leaves to h2 what h2 must judge."""
    direct, stock = _open_call(), _open_call()
    for size in (5, 1000, 16_384):
        assert compat.receive_data(direct.server, 1, size)
        stock.client.send_data(1, b"x" * size)
        (event,) = stock.to_server()
        assert isinstance(event, h2.events.DataReceived)
        assert _windows(direct.server, 1) == _windows(stock.server, 1)
    direct.server.increment_flow_control_window(500)
    direct.server.increment_flow_control_window(700, stream_id=1)
    assert _windows(direct.server, 1) == (_windows(stock.server, 1)[0] + 500, _windows(stock.server, 1)[1] + 700)
    # h2 goes on from that state: the request ends, the response ends, the stream closes.
    direct.client.send_data(1, b"x" * 10)  # keep the client's view of the windows in step
    direct.client.end_stream(1)
    kinds = [type(e) for e in direct.to_server()]
    assert h2.events.StreamEnded in kinds
    direct.server.send_data(1, b"reply", end_stream=True)
    direct.to_client()
    assert 1 not in direct.server.streams or direct.server.streams[1].closed

    pair = _open_call()
    before = _windows(pair.server, 1)
    window = before[1]
    assert not compat.receive_data(pair.server, 1, window + 1)  # past the window: FLOW_CONTROL_ERROR by h2
    assert not compat.receive_data(pair.server, 3, 10)  # no such stream
    assert _windows(pair.server, 1) == before
    pair.client.end_stream(1)
    pair.to_server()  # half closed (remote): h2 answers STREAM_CLOSED
    assert not compat.receive_data(pair.server, 1, 10)
    withlength = Pair()
    withlength.handshake()
    withlength.client.send_headers(1, [*REQUEST, (b"content-length", b"10")])
    withlength.to_server()
    assert not compat.receive_data(withlength.server, 1, 5), "content-length is h2's to check"


@hook("data-out")
def test_data_sent_directly_is_the_frame_h2_would_send() -> None:
    """``compat.send_data`` gives the bytes of h2's own DATA frame and charges the send windows as
    ``send_data`` does; the client reads them, and h2 sends what follows (trailers) in order."""
    direct, stock = _open_call(), _open_call()
    for payload in (b"a", b"b" * 1000, memoryview(b"c" * 5000)[1000:]):
        out = compat.send_data(direct.server, 1, payload)
        stock.server.send_data(1, payload)
        assert out == stock.server.data_to_send()
        assert direct.server.local_flow_control_window(1) == stock.server.local_flow_control_window(1)
        assert direct.server.outbound_flow_control_window == stock.server.outbound_flow_control_window
        (event,) = direct.client.receive_data(out)
        assert isinstance(event, h2.events.DataReceived) and event.data == bytes(payload)
    direct.server.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    assert isinstance(direct.to_client()[0], h2.events.TrailersReceived)

    pair = _open_call()
    window = pair.server.local_flow_control_window(1)
    assert compat.send_data(pair.server, 1, b"x" * (pair.server.max_outbound_frame_size + 1)) is None
    assert compat.send_data(pair.server, 3, b"x") is None  # no such stream
    while window:
        size = min(window, pair.server.max_outbound_frame_size)
        assert compat.send_data(pair.server, 1, b"x" * size) is not None
        window -= size
    assert compat.send_data(pair.server, 1, b"x") is None  # the window is spent
    pair.server.end_stream(1)
    assert compat.send_data(pair.server, 1, b"x") is None  # half closed (local)


@hook("huffman")
def test_huffman_decoding_is_hpacks_and_installs_into_hpacks_decoder() -> None:
    """``huffman.decode`` gives what hpack's decoder gives for every input, errors included, and
    once installed hpack's ``Decoder`` uses it."""
    import random

    import hpack.hpack
    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
    from hpack.huffman_table import decode_huffman

    from xdsd.transport import huffman

    def either(fn: Callable[[bytes], bytes], data: bytes) -> bytes | None:
        try:
            return fn(data)
        except hpack.HPACKDecodingError:
            return None

    rnd = random.Random(7)
    encoder = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
    for _ in range(3000):
        text = bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 40)))
        coded = encoder.encode(text)
        assert huffman.decode(coded) == text
        for damaged in (coded[:-1], coded + b"\xff", coded + b"\x00", bytes(rnd.randrange(256) for _ in range(8))):
            assert either(huffman.decode, damaged) == either(decode_huffman, damaged), damaged
    assert either(huffman.decode, b"\xff\xff\xff\xff") is None  # EOS inside a string (§5.2)
    assert either(huffman.decode, b"\x1f\xff") is None  # padding over 7 bits

    original = hpack.hpack.decode_huffman
    try:
        compat.install_huffman()
        assert "decode_huffman" in hpack.hpack.Decoder._decode_literal.__code__.co_names
        used: list[bytes] = []

        def counting(data: bytes) -> bytes:
            used.append(bytes(data))
            return huffman.decode(data)

        hpack.hpack.decode_huffman = counting
        block = hpack.Encoder().encode([(b"x-xdsd-token", b"v2.abcdefghijklmnop")], huffman=True)
        assert hpack.Decoder().decode(block, raw=True) == [(b"x-xdsd-token", b"v2.abcdefghijklmnop")]
        assert used, "hpack's decoder did not call decode_huffman"
    finally:
        hpack.hpack.decode_huffman = original


@hook("headers-out")
def test_response_headers_sent_directly_leave_h2_sending_trailers_next() -> None:
    """``compat.send_response_headers`` gives a HEADERS frame the client decodes to the response
    headers, leaves both HPACK tables alone, and h2's next ``send_headers`` on the stream sends
    trailers that end it; it leaves to h2 what it must send itself."""
    from xdsd.transport.connection import _RESPONSE_BLOCK, _RESPONSE_HEADERS

    decoder = hpack.Decoder()
    assert decoder.decode(_RESPONSE_BLOCK, raw=True) == list(_RESPONSE_HEADERS)
    assert len(decoder.header_table.dynamic_entries) == 0

    pair = Pair()
    pair.handshake()
    pair.client.send_headers(1, REQUEST)
    pair.to_server()
    out = compat.send_response_headers(pair.server, 1, _RESPONSE_BLOCK)
    assert out is not None
    (event,) = pair.client.receive_data(out)
    assert isinstance(event, h2.events.ResponseReceived) and event.headers == list(_RESPONSE_HEADERS)
    assert compat.send_response_headers(pair.server, 1, _RESPONSE_BLOCK) is None  # sent already
    pair.server.send_data(1, b"\0\0\0\0\0")
    pair.server.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    kinds = [type(e) for e in pair.to_client()]
    assert kinds == [h2.events.DataReceived, h2.events.TrailersReceived, h2.events.StreamEnded]

    pending = Pair()
    pending.handshake()
    pending.client.send_headers(1, REQUEST)
    pending.to_server()
    pending.server.encoder.header_table_size = 1024  # a size update is owed
    assert compat.send_response_headers(pending.server, 1, _RESPONSE_BLOCK) is None
    assert compat.send_response_headers(pending.server, 3, _RESPONSE_BLOCK) is None  # no such stream
