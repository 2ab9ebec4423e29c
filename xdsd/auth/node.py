"""The xDS server's authenticator: a node must present a token for its own id and service."""

from __future__ import annotations

from collections.abc import Callable

from envoy.config.core.v3 import base_pb2

from xdsd.auth.tokens import TOKEN_HEADER, TokenError, TokenSigner
from xdsd.server.stream import Authenticator


def token_authenticator(signer: TokenSigner) -> Authenticator:
    def authenticate(node: base_pb2.Node, metadata: dict[str, str]) -> str | None:
        token = metadata.get(TOKEN_HEADER)
        if not token:
            return f"missing-token: node {node.id!r} sent no {TOKEN_HEADER}"
        try:
            claims = signer.verify(token)
        except TokenError as exc:
            return f"bad-token: node {node.id!r}: {exc}"
        if claims.node_id != node.id:
            return f"wrong-node: node {node.id!r} presented a token for node {claims.node_id!r}"
        if claims.cluster != node.cluster:
            return (
                f"wrong-cluster: node {node.id!r} claims {node.cluster!r} "
                f"but its token is for {claims.cluster!r}"
            )
        return None

    return authenticate


def registration_authenticator(signer: TokenSigner) -> Callable[[str | None, str], str | None]:
    """A registration for service S needs a node token issued for S (any node id of S)."""

    def authenticate(token: str | None, service: str) -> str | None:
        if not token:
            return f"missing-token: send a node token for {service!r} in {TOKEN_HEADER}"
        try:
            claims = signer.verify(token)
        except TokenError as exc:
            return f"bad-token: {exc}"
        if claims.cluster != service:
            return f"wrong-cluster: the token is for {claims.cluster!r}, not {service!r}"
        return None

    return authenticate
