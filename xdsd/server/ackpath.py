"""The byte-level ACK fast path for state-of-the-world streams.

An ACK repeats the whole subscription: a gateway holding 10,000 clusters sends 10,000 names with
every ACK. When a request holds, byte for byte, the names (and type) of the last subscription
applied for its type, it is parsed without them and handled as the same subscription again.
Protobuf serializers (Envoy's included) write fields in field order: version and node, then names
and type, then nonce and error — so the repeated part is one contiguous block.
"""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2

from xdsd import wire

HEAD_FIELDS = frozenset({1, 2})  # DiscoveryRequest: version_info, node
TAIL_FIELDS = frozenset({5, 6})  # response_nonce, error_detail
BLOCK_FIELDS = frozenset({3, 4})  # resource_names, type_url

# Subscriptions of this many names are remembered; a sidecar's few names are cheaper to compare as they are.
SAME_NAMES_FROM = 64


def skip_fields(data: bytes, pos: int, allowed: frozenset[int], to_end: bool = False) -> int | None:
    """From ``pos``, skip length-delimited fields numbered in ``allowed``; the position of the first
    other field (or, with ``to_end``, None unless they run exactly to the end)."""
    try:
        while pos < len(data):
            key, after = wire.read_varint(data, pos)
            if key & 7 != 2 or key >> 3 not in allowed:
                return None if to_end else pos
            size, after = wire.read_varint(data, after)
            pos = after + size
    except ValueError:
        return None
    return pos if pos == len(data) else None


def same_subscription(data: bytes, blocks: dict[str, bytes]) -> tuple[str, int, int] | None:
    """(type URL, end of the head, start of the tail) if ``data`` is head + a remembered block +
    tail, with only version and node in the head and only nonce and error in the tail."""
    head_end = skip_fields(data, 0, HEAD_FIELDS)
    if head_end is None:
        return None
    for type_url, block in blocks.items():
        if data.startswith(block, head_end):
            tail_start = head_end + len(block)
            if skip_fields(data, tail_start, TAIL_FIELDS, to_end=True) is not None:
                return type_url, head_end, tail_start
    return None


def subscription_block(data: bytes, req: discovery_pb2.DiscoveryRequest) -> bytes | None:
    """The bytes of ``req``'s names and type (the part an ACK repeats) within its serialization
    ``data``, if they can be told apart from the rest; None for small subscriptions."""
    if len(req.resource_names) < SAME_NAMES_FROM:
        return None
    head_end = skip_fields(data, 0, HEAD_FIELDS)
    tail = b""
    if req.response_nonce:
        tail += wire.field(5, req.response_nonce.encode())
    if req.HasField("error_detail"):
        tail += wire.field(6, req.error_detail.SerializeToString(deterministic=True))
    tail_start = len(data) - len(tail)
    if head_end is None or tail_start < head_end or not data.endswith(tail):
        return None
    block = data[head_end:tail_start]
    try:
        parsed = discovery_pb2.DiscoveryRequest.FromString(block)
    except Exception:  # noqa: BLE001 - not a field boundary: no fast path for this type
        return None
    # The whole request parsed as ``req`` and is head + block + tail, with only version and node in
    # the head and only nonce and error in the tail: a block of names and type alone holds exactly
    # ``req``'s names, in order (a repeated field is the concatenation of its elements).
    if ({f.number for f, _ in parsed.ListFields()} <= BLOCK_FIELDS and parsed.type_url == req.type_url
            and len(parsed.resource_names) == len(req.resource_names)):
        return block
    return None
