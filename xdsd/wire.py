"""Protobuf wire-format pieces, for responses assembled from bytes serialized once
(https://protobuf.dev/programming-guides/encoding/): a message is the concatenation of its fields."""

from __future__ import annotations


def varint(n: int) -> bytes:
    """A base-128 varint (non-negative ``n``)."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def head(number: int, size: int) -> bytes:
    """Tag and length of a length-delimited field (wire type 2) of ``size`` bytes."""
    return varint(number << 3 | 2) + varint(size)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return head(number, len(payload)) + payload


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; ValueError if truncated or too long."""
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
