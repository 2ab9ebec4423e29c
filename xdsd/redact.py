"""The one view of a resource that may be shown to anyone but the node it belongs to.

A private key leaves xdsd only inside an SDS response to its own node. Every other view of a
resource — CSDS, ``/debug/config_dump``, ``xdsd config-dump``, traces, logs — goes through
``redacted``: each ``DataSource`` that can hold key material is replaced by the marker
``[redacted]``, whatever resource type carries it.
"""

from __future__ import annotations

from google.protobuf import any_pb2
from google.protobuf.message import Message

from xdsd import typeurls

MARKER = "[redacted]"

# Secret fields (envoy.extensions.transport_sockets.tls.v3.Secret and what it nests) that hold
# key material: TlsCertificate.private_key and .password, TlsSessionTicketKeys.keys,
# GenericSecret.secret (HMAC keys, OAuth2 client secrets).
_SECRET_FIELDS = frozenset({"private_key", "password", "keys", "secret"})


def _scrub(message: Message) -> bool:
    """Blank every key-bearing field under ``message`` (in place). True if anything was."""
    changed = False
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        name = field.name
        values = value if field.is_repeated else [value]
        if name in _SECRET_FIELDS:
            for item in values:
                if isinstance(item, Message):
                    item.Clear()
                    if item.DESCRIPTOR.fields_by_name.get("inline_string") is not None:
                        item.inline_string = MARKER  # type: ignore[attr-defined]
                    changed = True
            continue
        if field.message_type.full_name == "google.protobuf.Any":
            continue  # typed configs carry no secrets of ours
        for item in values:
            if isinstance(item, Message) and _scrub(item):
                changed = True
    return changed


def redacted(type_url: str, body: bytes) -> bytes:
    """The serialized resource with its key material blanked (other types unchanged)."""
    if type_url != typeurls.SECRET:
        return body
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    secret = secret_pb2.Secret.FromString(body)
    return secret.SerializeToString(deterministic=True) if _scrub(secret) else body


def redacted_any(type_url: str, body: bytes) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=redacted(type_url, body))
