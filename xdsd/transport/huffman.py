"""HPACK's Huffman code (RFC 7541 §5.2, Appendix B), decoded a byte at a time.

hpack decodes a nibble at a time, two table steps and two flag tests per byte; a node token's ~240
coded bytes made that a tenth of a new connection's cost. Here one step per byte: the table maps
(position in the code tree, input byte) to the next position and the bytes completed on the way.
A code that reaches EOS, or padding that is longer than 7 bits or not all ones, is an error, as
§5.2 says. The tables are built once (``tables``, ~30 ms), from the codes hpack encodes with.
"""

from __future__ import annotations

import functools

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

_EOS = 256


@functools.cache
def tables() -> tuple[list[int], list[bytes], list[bool]]:
    """(next, out, accepting): for state ``s`` (a multiple of 256) and byte ``b``, ``next[s | b]``
    is the state after ``b`` and ``out[s | b]`` the bytes it completed; ``accepting[s >> 8]``
    whether a string may end in ``s``. The last state is the failed one, which never leaves."""
    # The code tree: node 0 is the root; children[n] = [child for bit 0, child for bit 1]; a leaf is
    # -1 - symbol. Internal nodes also record whether their path is all ones, and its length.
    children: list[list[int]] = [[0, 0]]
    ones = [True]
    depth = [0]
    for symbol, (code, length) in enumerate(zip(REQUEST_CODES, REQUEST_CODES_LENGTH, strict=True)):
        node = 0
        for i in range(length - 1, -1, -1):
            bit = (code >> i) & 1
            if i == 0:
                children[node][bit] = -1 - symbol
                break
            child = children[node][bit]
            if child == 0:
                child = len(children)
                children.append([0, 0])
                ones.append(ones[node] and bit == 1)
                depth.append(depth[node] + 1)
                children[node][bit] = child
            node = child
    states = len(children)
    failed = states

    # Four bits at a time first, then a byte as two nibbles.
    def walk(node: int, value: int, bits: int) -> tuple[int, bytes]:
        out = bytearray()
        for i in range(bits - 1, -1, -1):
            child = children[node][(value >> i) & 1]
            if child >= 0:
                node = child
                continue
            symbol = -1 - child
            if symbol == _EOS:
                return failed, b""
            out.append(symbol)
            node = 0
        return node, bytes(out)

    nibble = [walk(node, value, 4) for node in range(states) for value in range(16)]
    nxt: list[int] = []
    out: list[bytes] = []
    for node in range(states):
        for byte in range(256):
            middle, first = nibble[node * 16 + (byte >> 4)]
            if middle == failed:
                nxt.append(failed << 8)
                out.append(b"")
                continue
            end, second = nibble[middle * 16 + (byte & 0xF)]
            nxt.append(end << 8)
            out.append(first + second if first else second)
    nxt.extend([failed << 8] * 256)
    out.extend([b""] * 256)
    accepting = [node == 0 or (ones[node] and depth[node] <= 7) for node in range(states)] + [False]
    return nxt, out, accepting


def decode(data: bytes | bytearray | memoryview) -> bytes:
    """The bytes a Huffman-coded string stands for; HPACKDecodingError if it is not one."""
    if not data:
        return b""
    nxt, out, accepting = tables()
    state = 0
    parts = []
    append = parts.append
    for byte in bytes(data):
        index = state | byte
        state = nxt[index]
        append(out[index])
    if not accepting[state >> 8]:
        raise HPACKDecodingError("Invalid Huffman string")
    return b"".join(parts)
