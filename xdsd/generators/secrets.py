"""SDS: a node's own SVID and the trust bundle; never another identity's key."""

from __future__ import annotations

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from xdsd.ca import Credentials
from xdsd.generators.tls import bundle_secret_name


def generate(credentials: Credentials, own_id: str) -> list[secret_pb2.Secret]:
    svid = credentials.svids.get(own_id)
    if svid is None or not credentials.bundle_pem:
        return []
    own = secret_pb2.Secret(name=own_id)
    own.tls_certificate.certificate_chain.inline_bytes = svid.cert_chain_pem
    own.tls_certificate.private_key.inline_bytes = svid.key_pem
    bundle = secret_pb2.Secret(name=bundle_secret_name(credentials.trust_domain))
    bundle.validation_context.trusted_ca.inline_bytes = credentials.bundle_pem
    return [own, bundle]
