"""A stream's first request names its node: authenticate it, check what it says, decide its group."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from envoy.config.core.v3 import base_pb2

from xdsd.auth.access import Caller, Denied
from xdsd.auth.tokens import TOKEN_HEADER
from xdsd.node import FetchMode, NodeError, NodeGroup

# gRPC metadata a standalone-services node must also send on the streams our config sources open.
PROPAGATED_METADATA = (TOKEN_HEADER,)

# (node, gRPC metadata) -> the caller (kept for the stream's life); raises Denied.
Authenticator = Callable[[base_pb2.Node, Mapping[str, str]], Caller]


class ProtocolError(Exception):
    """The client broke the protocol; the stream ends with INVALID_ARGUMENT."""


class Refused(Exception):
    """The client did not prove who it is (UNAUTHENTICATED), or its credentials do not allow what
    it asked (PERMISSION_DENIED): the stream ends with that status."""

    def __init__(self, denied: Denied) -> None:
        super().__init__(str(denied))
        self.denied = denied


def admit(node: base_pb2.Node, metadata: Mapping[str, str], fetch: FetchMode,
          authenticator: Authenticator | None) -> tuple[Caller | None, NodeGroup, base_pb2.Node]:
    """(who the token says the node is, the node's group, the node as kept). Raises Refused or
    ProtocolError. The first request carries the node (set_node_on_first_message_only)."""
    if not node.id:
        raise ProtocolError("the first request of a stream must carry node.id")
    caller = None
    if authenticator is not None:
        try:
            caller = authenticator(node, metadata)
        except Denied as exc:
            raise Refused(exc) from None
    carried: tuple[tuple[str, str], ...] = ()
    if fetch is not FetchMode.ADS:
        carried = tuple((k, metadata[k]) for k in PROPAGATED_METADATA if k in metadata)
    try:
        group = NodeGroup.from_node(node, fetch, carried)
    except NodeError as exc:
        raise ProtocolError(str(exc)) from None
    # Keep who the node is, not its build's catalogue: Envoy sends ~100 `extensions` and its client
    # features on every stream, kilobytes per proxy that nothing here reads.
    kept = base_pb2.Node()
    kept.CopyFrom(node)
    kept.ClearField("extensions")
    kept.ClearField("client_features")
    return caller, group, kept
