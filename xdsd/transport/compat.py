"""Every use the transport makes of h2, hpack and hyperframe beyond their documented API, in one place.

The transport drives h2's public API (``H2Connection``'s methods, ``h2.events``, ``h2.errors``,
``h2.exceptions``, ``h2.config``, ``h2.settings.SettingCodes``) directly. What is not public -- a
private attribute or method, a class constant read at construction, an attribute replaced after it,
a behaviour no document promises -- is done here and nowhere else, and each hook below says what it
relies on and why we need it. ``tests/unit/test_transport_compat.py`` checks each one (by name, in
``HOOKS``) against the installed versions, and pyproject.toml pins the three packages to the minor
versions in ``TESTED``: before moving a pin, run that test with the new versions.

Worked around in connection.py, not relied upon (``FrameWalk``, the churn limits): h2 checks a frame's
length only once the whole frame is buffered, accepts up to 64 CONTINUATION frames per header block,
and visits every stream for each SETTINGS frame. Should a new h2 fix them, those defences still hold.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.settings
import h2.stream
import h2.windows
import hpack
import hpack.hpack
from hyperframe.frame import GoAwayFrame

from xdsd.transport import huffman

# The versions every hook below was checked with (pyproject.toml pins their minor versions).
TESTED = {"h2": "4.4.1", "hpack": "4.2.0", "hyperframe": "6.1.0"}

# Each hook: what of the libraries it relies on. The test module checks every one of them.
HOOKS = {
    "closed-streams": "h2: H2Connection.MAX_CLOSED_STREAMS, read by __init__ to bound _closed_streams",
    "held-window": "h2: H2Connection._inbound_flow_control_window_manager, a h2.windows.WindowManager "
                   "whose process_bytes() is h2's only way to reopen the connection window by itself",
    "local-settings": "h2: H2Connection.local_settings replaced before initiate_connection(); "
                      "Settings(initial_values=...) are current at once, not pending an ACK",
    "encoder": "h2: H2Connection.encoder replaced, read at every use; h2 assigns the client's "
               "SETTINGS_HEADER_TABLE_SIZE to encoder.header_table_size",
    "encoder-table-size": "hpack: Encoder.header_table_size, a property (its fset resizes "
                          "header_table.maxsize and queues a table size update)",
    "decoder": "h2: H2Connection.decoder replaced, read at every use; hpack errors become ProtocolError; "
               "hpack: Decoder(max_header_list_size)",
    "decoder-size-updates": "hpack: Decoder._update_encoding_context(data) -> int, called by "
                            "decode(data, raw) once per dynamic table size update",
    "goaway": "hyperframe: GoAwayFrame(stream_id, error_code, last_stream_id).serialize(), written past "
              "h2's state machine, which keeps serving the open streams",
    "protocol-error-goaway": "h2: when receive_data() raises ProtocolError, a GOAWAY is already queued "
                             "in data_to_send()",
    "control-frames": "h2: H2Connection.state_machine.state, .outbound_flow_control_window and .streams "
                      "(open streams by id); H2Stream.state_machine.state and .outbound_flow_control_window, "
                      "read by local_flow_control_window() and send_data()",
    "huffman": "hpack: hpack.hpack.decode_huffman, the module global Decoder._decode_literal calls for "
               "every Huffman-coded name and value; hpack.huffman_constants.REQUEST_CODES(_LENGTH)",
    "headers-out": "h2: H2StreamStateMachine.headers_sent, which SEND_HEADERS sets (response_sent) on an "
                   "OPEN or HALF_CLOSED_REMOTE stream without changing its state; hpack: "
                   "Encoder.table_size_changes (size updates owed at the start of the next block)",
    "data-in": "h2: H2Connection._inbound_flow_control_window_manager and H2Stream._inbound_window_manager "
               "(h2.windows.WindowManager: current_window_size, window_consumed()), "
               "H2Stream._expected_content_length; RECV_DATA changes no state of an open stream",
    "data-out": "h2: H2Stream.outbound_flow_control_window and H2Connection.outbound_flow_control_window, "
                "what send_data() decrements; SEND_DATA changes no state of an open stream; "
                "data_to_send() returns (and empties) everything queued before",
}


def installed() -> dict[str, str]:
    """The installed versions of the three packages (for messages)."""
    found = {}
    for name in TESTED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def describe_versions() -> str:
    """``installed h2 4.4.1, ...; tested h2 4.4.1, ...``."""
    have = ", ".join(f"{name} {version}" for name, version in installed().items())
    tested = ", ".join(f"{name} {version}" for name, version in TESTED.items())
    return f"installed {have}; tested {tested}"


# -- h2.connection.H2Connection ------------------------------------------------------------------


class HeldWindow(h2.windows.WindowManager):
    """Hook "held-window". The connection's receive window, reopened only by the transport
    (``H2Connection.increment_flow_control_window``, which calls ``window_opened``).

    Relies on: ``H2Connection._inbound_flow_control_window_manager`` being the connection window's
    manager, set in ``__init__`` and replaceable after it; ``process_bytes`` being the only way h2
    reopens that window by itself (``acknowledge_received_data``, which we never call, and DATA on
    a closed stream); ``window_consumed`` / ``window_opened`` / ``current_window_size`` keeping
    ``inbound_flow_control_window``.

    Why: for DATA on closed streams h2 reopens the window on its own, up to the largest window it
    ever had: a client could make us reopen it past our buffer limits (refused calls' DATA is
    dropped; ``Connection.refill`` decides what the window may be)."""

    def process_bytes(self, size: int) -> int | None:
        return None


def server_connection_class(*, max_closed_streams: int,
                            receive_window: int) -> type[h2.connection.H2Connection]:
    """Hooks "closed-streams" and "held-window": an ``H2Connection`` subclass remembering at most
    ``max_closed_streams`` closed streams, its receive window held at ``receive_window`` until the
    transport opens it (``HeldWindow``).

    "closed-streams" relies on: the class constant ``MAX_CLOSED_STREAMS``, read by ``__init__`` as
    the size of ``_closed_streams`` (a dict that drops its oldest entries past it).

    Why: h2's default, 65,536 closed streams, is ~8 MB per connection that a client can fill by
    opening and closing streams."""

    class ServerConnection(h2.connection.H2Connection):
        MAX_CLOSED_STREAMS = max_closed_streams

        def __init__(self, config: h2.config.H2Configuration | None = None) -> None:
            super().__init__(config=config)
            self._inbound_flow_control_window_manager = HeldWindow(receive_window)

    return ServerConnection


def replace_local_settings(conn: h2.connection.H2Connection, values: dict[h2.settings.SettingCodes, int]) -> None:
    """Hook "local-settings": our SETTINGS in effect from the connection's start. Call before
    ``initiate_connection()``, which sends them.

    Relies on: h2 reading ``conn.local_settings`` at each use (stream windows, the concurrent stream
    limit, the SETTINGS frame it sends), never a copy made in ``__init__``; ``Settings(client,
    initial_values)`` making those values current at once, not pending the client's ACK (so the ACK
    reports no change: h2 then leaves ``decoder.max_header_list_size`` alone, see ``install_decoder``).

    Why: ``update_settings()`` would apply them only once the client ACKs, while the client may open
    streams before: their windows (``call.Call.window`` mirrors them) and the stream limit would be
    h2's defaults until then."""
    conn.local_settings = h2.settings.Settings(client=conn.config.client_side, initial_values=values)


# -- hpack: the connection's encoder and decoder ------------------------------------------------------


class CappedEncoder(hpack.Encoder):
    """Hooks "encoder-table-size" (and "encoder", via ``install_encoder``): an HPACK encoder whose
    dynamic table is at most ``max_table_size`` bytes, however large a table the client allows.

    Relies on: ``hpack.Encoder.header_table_size`` being a property whose setter sets
    ``header_table.maxsize`` and queues a dynamic table size update for the peer; h2 assigning the
    client's SETTINGS_HEADER_TABLE_SIZE to it.

    Why: RFC 7541 §4.2 lets an encoder use less than the peer allows. With the client's size, every
    distinct header value sent (grpc-message echoes client input) stayed in a table h2 searched
    linearly for every header."""

    def __init__(self, max_table_size: int) -> None:
        super().__init__()
        self.xdsd_max_table_size = max_table_size

    @property
    def header_table_size(self) -> int:
        return int(self.header_table.maxsize)

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        hpack.Encoder.header_table_size.fset(self, min(value, self.xdsd_max_table_size))


class LimitedDecoder(hpack.Decoder):
    """Hooks "decoder-size-updates" (and "decoder", via ``install_decoder``): at most
    ``MAX_SIZE_UPDATES`` dynamic table size updates at the start of a header block (RFC 7541 §4.2).

    Relies on: ``hpack.Decoder.decode(data, raw)`` calling ``_update_encoding_context(data)`` once
    per size update, which returns the bytes it consumed; an ``HPACKDecodingError`` raised there
    leaving ``decode``.

    Why: hpack takes any number of them, a loop turn (~0.7 us) per byte: 1 MiB of them in one
    header block held the event loop for 0.7 s."""

    MAX_SIZE_UPDATES = 2
    _updates = 0

    def decode(self, data: bytes, raw: bool = False) -> Any:
        self._updates = 0
        return super().decode(data, raw)

    def _update_encoding_context(self, data: bytes | memoryview) -> int:
        self._updates += 1
        if self._updates > self.MAX_SIZE_UPDATES:
            raise hpack.HPACKDecodingError("more than two dynamic table size updates in a header block")
        return int(super()._update_encoding_context(data))


def install_encoder(conn: h2.connection.H2Connection, max_table_size: int) -> None:
    """Hook "encoder": ``conn`` encodes headers with a ``CappedEncoder``. Call before the client's
    SETTINGS are acknowledged (``initiate_connection`` / the first ``receive_data``).

    Relies on: h2 reading ``conn.encoder`` at each use (passing it to the stream that sends HEADERS),
    and setting ``conn.encoder.header_table_size`` when the client's SETTINGS change it.

    Why: ``H2Connection`` takes no encoder; this is the only way to cap the table (see
    ``CappedEncoder``)."""
    conn.encoder = CappedEncoder(max_table_size)


def install_decoder(conn: h2.connection.H2Connection, max_header_list_size: int) -> None:
    """Hook "decoder": ``conn`` decodes header blocks with a ``LimitedDecoder`` that refuses header
    lists over ``max_header_list_size`` (RFC 9113 §6.5.2, the size we announce).

    Relies on: h2 reading ``conn.decoder`` at each use; ``hpack.Decoder(max_header_list_size)``; h2
    turning the decoder's errors into ``ProtocolError`` (GOAWAY PROTOCOL_ERROR; ENHANCE_YOUR_CALM for
    an oversized header list), which ends the connection. With ``replace_local_settings`` h2 never updates
    the decoder's limit itself (our SETTINGS are current from the start), so it is given here.

    Why: ``H2Connection`` takes no decoder; this is the only way to limit size updates (see
    ``LimitedDecoder``)."""
    conn.decoder = LimitedDecoder(max_header_list_size)


def install_huffman() -> None:
    """Hook "huffman": every hpack decoder in the process decodes Huffman-coded strings with
    ``huffman.decode`` (the same function of the bytes: it is checked against hpack's own over
    random input). Builds its tables first, so that no connection pays for them.

    Relies on: ``Decoder._decode_literal`` calling the module global ``hpack.hpack.decode_huffman``
    (looked up at each call); the codes in ``hpack.huffman_constants``.

    Why: hpack decodes four bits per table step; a node token is ~240 coded bytes in every new
    connection's first HEADERS, and took ~50 us of it (~15 us a byte at a time)."""
    huffman.tables()
    hpack.hpack.decode_huffman = huffman.decode


# -- hyperframe: GOAWAY past h2's state machine -----------------------------------------------------


def goaway(last_stream_id: int, error_code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.NO_ERROR) -> bytes:
    """Hook "goaway": a GOAWAY frame (RFC 9113 §6.8) to write to the transport ourselves, after what
    h2 has queued.

    Relies on: hyperframe's ``GoAwayFrame(stream_id=0, error_code=..., last_stream_id=...)`` and
    ``serialize()``; h2 not needing to know it was sent (it keeps running the open streams, and new
    ones the client opens anyway are refused by the transport with RST_STREAM(REFUSED_STREAM)).

    Why: h2's ``close_connection()`` moves its state machine to CLOSED, after which every call still
    running fails; a graceful stop must let them finish."""
    return GoAwayFrame(stream_id=0, error_code=error_code, last_stream_id=last_stream_id).serialize()


# Hook "protocol-error-goaway" has no code here: ``Connection._process`` relies on it by writing
# out ``data_to_send()`` (h2's GOAWAY with the error's code) after ``receive_data()`` raised
# ``h2.exceptions.ProtocolError``, then closing. Why: a client that broke the protocol learns why.


# -- control frames ------------------------------------------------------------------------------

_MAX_WINDOW = 2**31 - 1  # RFC 9113 §6.9.1
_SENDING = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE,
                      h2.stream.StreamState.HALF_CLOSED_LOCAL})


def control_ready(conn: h2.connection.H2Connection) -> bool:
    """Hook "control-frames": the connection is open both ways (the client's preface and SETTINGS
    are in), so WINDOW_UPDATE and PING frames may be applied without h2."""
    return conn.state_machine.state is h2.connection.ConnectionState.SERVER_OPEN


def window_update(conn: h2.connection.H2Connection, stream_id: int, increment: int) -> bool:
    """Hook "control-frames": a WINDOW_UPDATE (RFC 9113 §6.9) applied to h2's outbound windows
    directly. False, changing nothing, when h2 must see the frame itself: an increment of 0, a
    window past 2^31-1, a connection not open, a stream h2 does not hold in a state that sends
    (h2 then raises the right error, or ignores a closed stream's update).

    Relies on: ``H2Connection.state_machine.state``, ``.outbound_flow_control_window`` and
    ``.streams``; ``H2Stream.state_machine.state`` and ``.outbound_flow_control_window``: the
    windows that ``local_flow_control_window()`` and ``send_data()`` read.

    Why: grpc-core clients (and Envoy) answer each response with WINDOW_UPDATE frames (and a BDP
    PING); through h2's frame machinery each costs ~10 us, three to four per pushed response."""
    if increment <= 0 or not control_ready(conn):
        return False
    if stream_id == 0:
        window = conn.outbound_flow_control_window + increment
        if window > _MAX_WINDOW:
            return False
        conn.outbound_flow_control_window = window
        return True
    stream = conn.streams.get(stream_id)
    if stream is None or stream.state_machine.state not in _SENDING:
        return False
    window = stream.outbound_flow_control_window + increment
    if window > _MAX_WINDOW:
        return False
    stream.outbound_flow_control_window = window
    return True


# -- DATA frames of open streams -----------------------------------------------------------------

_RECEIVING = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL})
_SENDS_DATA = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE})


def receive_data(conn: h2.connection.H2Connection, stream_id: int, length: int) -> bool:
    """Hook "data-in": a DATA frame of ``length`` bytes, without padding or END_STREAM, received on
    ``stream_id`` as h2 would receive it: both receive windows shrink by its length (RFC 9113 §6.9).
    False, changing nothing, when h2 must see the frame itself: the connection not open, a stream h2
    does not hold open for receiving, a stream with a content-length to check, a frame past either
    window (h2 then raises the right error).

    Relies on: ``H2Connection._inbound_flow_control_window_manager`` and
    ``H2Stream._inbound_window_manager`` holding the windows (``current_window_size``;
    ``window_consumed`` shrinks them, as h2's ``_receive_data_frame`` and ``H2Stream.receive_data``
    do); ``H2Stream._expected_content_length`` (None: nothing to count); RECV_DATA leaving an OPEN
    or HALF_CLOSED_LOCAL stream and an open connection in their states, with no frame to send.

    Why: an ACK is one small DATA frame; through h2's frame buffer, frame objects, dispatch and two
    state machines it cost ~15 us, a tenth of a pushed stream's cost and of a reconnect's."""
    stream = conn.streams.get(stream_id)
    if (stream is None or stream.state_machine.state not in _RECEIVING
            or stream._expected_content_length is not None):
        return False
    connection_window = conn._inbound_flow_control_window_manager
    stream_window = stream._inbound_window_manager
    if length > connection_window.current_window_size or length > stream_window.current_window_size:
        return False
    connection_window.window_consumed(length)
    stream_window.window_consumed(length)
    return True


def send_data(conn: h2.connection.H2Connection, stream_id: int, data: bytes | memoryview) -> bytes | None:
    """Hook "data-out": the bytes to write for a DATA frame (no padding, no END_STREAM) carrying
    ``data`` on ``stream_id``, with both send windows charged as h2's ``send_data`` charges them.
    None, changing nothing, when h2 must send it: the connection not open, a stream h2 does not hold
    open for sending, ``data`` past a window or the peer's frame size. The caller writes everything
    h2 queued before (``data_to_send()``) ahead of these bytes.

    Relies on: ``H2Connection.outbound_flow_control_window`` and ``H2Stream.outbound_flow_control_window``
    being the windows ``send_data`` reads and decrements; SEND_DATA leaving an OPEN or
    HALF_CLOSED_REMOTE stream and an open connection in their states.

    Why: through h2 a response's DATA frame is a frame object, two state machines and a copy into
    h2's buffer; a fan-out sends one per stream."""
    if not control_ready(conn):
        return None
    stream = conn.streams.get(stream_id)
    if stream is None or stream.state_machine.state not in _SENDS_DATA:
        return None
    size = len(data)
    if (size > conn.outbound_flow_control_window or size > stream.outbound_flow_control_window
            or size > conn.max_outbound_frame_size):
        return None
    conn.outbound_flow_control_window -= size
    stream.outbound_flow_control_window -= size
    return b"".join((size.to_bytes(3, "big"), b"\x00\x00", stream_id.to_bytes(4, "big"), data))


def send_response_headers(conn: h2.connection.H2Connection, stream_id: int, block: bytes) -> bytes | None:
    """Hook "headers-out": the bytes of a HEADERS frame (END_HEADERS, no END_STREAM) carrying the
    response header ``block``, with h2's stream recorded as having sent its response headers (so
    the next ``send_headers`` sends trailers). ``block`` must use only HPACK's static table and
    literals that are not indexed (RFC 7541 §6.1, §6.2.2): the same bytes, whatever the connection's
    encoder holds. None, changing nothing, when h2 must send them: the connection not open, a stream
    not open for sending or that sent headers already, the encoder owing a dynamic table size
    update (it must start the next header block, RFC 7541 §4.2), a block past the frame size.

    Relies on: ``H2Stream.state_machine.headers_sent`` being what SEND_HEADERS sets on an OPEN or
    HALF_CLOSED_REMOTE stream (``response_sent``), leaving its state and the connection's as they
    are; ``hpack.Encoder.table_size_changes`` listing the size updates not yet sent.

    Why: every call's response headers are the same; through h2 they were validated, normalized,
    HPACK-encoded and indexed anew, ~70 us of each new xDS stream."""
    if not control_ready(conn):
        return None
    stream = conn.streams.get(stream_id)
    if stream is None or stream.state_machine.state not in _SENDS_DATA or stream.state_machine.headers_sent:
        return None
    if conn.encoder.table_size_changes or len(block) > conn.max_outbound_frame_size:
        return None
    stream.state_machine.headers_sent = True
    return b"".join((len(block).to_bytes(3, "big"), b"\x01\x04", stream_id.to_bytes(4, "big"), block))
