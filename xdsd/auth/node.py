"""The xDS streams' authenticator: a node must present a token for its own id and service."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from envoy.config.core.v3 import base_pb2

from xdsd.auth.access import Access, Caller
from xdsd.auth.tokens import TOKEN_HEADER

# (the node of a stream's first request, the stream's gRPC metadata) -> the caller; raises Denied.
NodeAuthenticator = Callable[[base_pb2.Node, Mapping[str, str]], Caller]


def node_authenticator(access: Access) -> NodeAuthenticator:
    def authenticate(node: base_pb2.Node, metadata: Mapping[str, str]) -> Caller:
        return access.node(metadata.get(TOKEN_HEADER), node.id, node.cluster)

    return authenticate
