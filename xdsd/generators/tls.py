"""Transport sockets for mutual TLS between sidecars, with certificates from SDS.

Both sides verify the peer by its SPIFFE ID (the URI SAN): a caller requires the exact identity
of the service it meant to reach; an inbound listener requires any identity of the trust domain.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2

from xdsd.generators.node import NodeGroup, config_source

TLS_SOCKET = "envoy.transport_sockets.tls"


def bundle_secret_name(trust_domain: str) -> str:
    return f"spiffe://{trust_domain}"


def _common(group: NodeGroup, own_id: str, trust_domain: str, peer: string_pb2.StringMatcher) -> tls_pb2.CommonTlsContext:
    ctx = tls_pb2.CommonTlsContext()
    cert = ctx.tls_certificate_sds_secret_configs.add(name=own_id)
    cert.sds_config.CopyFrom(config_source(group))
    combined = ctx.combined_validation_context
    san = combined.default_validation_context.match_typed_subject_alt_names.add()
    san.san_type = common_pb2.SubjectAltNameMatcher.URI
    san.matcher.CopyFrom(peer)
    combined.validation_context_sds_secret_config.name = bundle_secret_name(trust_domain)
    combined.validation_context_sds_secret_config.sds_config.CopyFrom(config_source(group))
    ctx.tls_params.tls_minimum_protocol_version = common_pb2.TlsParameters.TLSv1_2
    return ctx


def upstream_socket(group: NodeGroup, own_id: str, trust_domain: str, peer_id: str) -> base_pb2.TransportSocket:
    """Originate mTLS and accept only ``peer_id`` on the other end."""
    utc = tls_pb2.UpstreamTlsContext()
    utc.common_tls_context.CopyFrom(_common(group, own_id, trust_domain, string_pb2.StringMatcher(exact=peer_id)))
    socket = base_pb2.TransportSocket(name=TLS_SOCKET)
    socket.typed_config.Pack(utc)
    return socket


def downstream_socket(group: NodeGroup, own_id: str, trust_domain: str) -> base_pb2.TransportSocket:
    """Terminate mTLS; require a client certificate from the trust domain."""
    dtc = tls_pb2.DownstreamTlsContext()
    dtc.require_client_certificate.value = True
    dtc.common_tls_context.CopyFrom(
        _common(group, own_id, trust_domain, string_pb2.StringMatcher(prefix=f"spiffe://{trust_domain}/"))
    )
    socket = base_pb2.TransportSocket(name=TLS_SOCKET)
    socket.typed_config.Pack(dtc)
    return socket
