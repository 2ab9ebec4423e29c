"""Envoy bootstrap files that point a stock Envoy at xdsd (``xdsd bootstrap``)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

import yaml

from xdsd.auth.tokens import TOKEN_HEADER
from xdsd.ca.serving import SERVER_NAME
from xdsd.node import (
    META_ADMIN_ADDRESS,
    META_APP_ADDRESS,
    META_AUTHZ_CLUSTER,
    META_INBOUND_ADDRESS,
    XDS_CLUSTER,
)

AUTHZ_CLUSTER = "xdsd_authz"  # ext_authz over HTTP/1.1 (``--authz-http-port``)


@dataclass(frozen=True, slots=True)
class BootstrapOptions:
    node_id: str
    cluster: str
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000
    # More xdsd replicas (``--xds-address`` repeated): the xDS cluster reaches every one; a stream
    # that breaks is opened again on another within a second.
    xds_more: tuple[tuple[str, int], ...] = ()
    admin_address: str = "127.0.0.1"
    admin_port: int = 9901
    ads: bool = True
    delta: bool = False
    token: str | None = None  # node token, sent on every xDS stream and every ext_authz check
    xds_tls_ca: str | None = None  # PEM file on the Envoy's machine: verify xdsd with this CA
    xds_tls_ca_pem: bytes | None = None  # the CA bundle itself, embedded (what `xdsd bootstrap` does by default)
    # The name verified on xdsd's certificate (and sent as SNI). Default: "xdsd" (a name every serving
    # certificate of xdsd's own CA carries) with an embedded bundle, the xDS host with ``xds_tls_ca``.
    xds_tls_server_name: str | None = None
    xds_plaintext: bool = False  # xdsd serve --xds-plaintext: no TLS to xdsd
    inbound_address: str | None = None  # sidecars: where this instance's inbound listener binds
    app_address: str | None = None  # sidecars: where this instance's app listens
    zone: str | None = None  # node.locality.zone: this Envoy prefers endpoints in its own zone
    authz_http_port: int | None = None  # xdsd's ext_authz over HTTP on the xDS host; None: over gRPC


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _loopback_for(address: str) -> str:
    """The admin address as reachable from Envoy itself (a wildcard listens on loopback too)."""
    if address == "0.0.0.0":
        return "127.0.0.1"
    if address == "::":
        return "::1"
    return address


def _api_config_source(opts: BootstrapOptions) -> dict[str, Any]:
    service: dict[str, Any] = {
        "envoy_grpc": {
            "cluster_name": XDS_CLUSTER,
            # Reconnect quickly after a control-plane restart; Envoy keeps serving its last
            # config meanwhile.
            "retry_policy": {"retry_back_off": {"base_interval": "0.25s",
                                                "max_interval": "1s" if _several(opts) else "5s"}},
        }
    }
    if opts.token:
        service["initial_metadata"] = [{"key": TOKEN_HEADER, "value": opts.token}]
    return {
        "api_type": "DELTA_GRPC" if opts.delta else "GRPC",
        "transport_api_version": "V3",
        "grpc_services": [service],
        "set_node_on_first_message_only": True,
    }


def render(opts: BootstrapOptions) -> dict[str, Any]:
    """The bootstrap as a plain dict (YAML/JSON-ready)."""
    if opts.ads:
        dynamic: dict[str, Any] = {
            "ads_config": _api_config_source(opts),
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        }
    else:
        dynamic = {
            "cds_config": {"api_config_source": _api_config_source(opts), "resource_api_version": "V3"},
            "lds_config": {"api_config_source": _api_config_source(opts), "resource_api_version": "V3"},
        }
    node: dict[str, Any] = {"id": opts.node_id, "cluster": opts.cluster}
    # Where this Envoy's admin listens: xdsd's stats listener (telemetry.stats) forwards
    # /stats/prometheus there.
    metadata = {META_ADMIN_ADDRESS: _host_port(_loopback_for(opts.admin_address), opts.admin_port)}
    if opts.inbound_address:
        metadata[META_INBOUND_ADDRESS] = opts.inbound_address
    if opts.app_address:
        metadata[META_APP_ADDRESS] = opts.app_address
    node["metadata"] = metadata
    if opts.zone:
        node["locality"] = {"zone": opts.zone}
    static = [_xds_cluster(opts)]
    if opts.authz_http_port is not None:
        # The listeners xdsd pushes send their ext_authz checks to this cluster (HTTP/1.1).
        metadata[META_AUTHZ_CLUSTER] = AUTHZ_CLUSTER
        static.append(_authz_cluster(opts))
    return {
        "node": node,
        "admin": {"address": {"socket_address": {"address": opts.admin_address, "port_value": opts.admin_port}}},
        "dynamic_resources": dynamic,
        "static_resources": {"clusters": static},
    }


def _authz_cluster(opts: BootstrapOptions) -> dict[str, Any]:
    """xdsd's HTTP ext_authz: the xDS host, another port, HTTP/1.1 keep-alive, TLS as for xDS."""
    assert opts.authz_http_port is not None
    cluster = _xds_cluster(opts)
    cluster["name"] = AUTHZ_CLUSTER
    # HTTP/1.1 (one check per connection at a time). Envoy closes idle connections after 60 s, before
    # xdsd's idle timeout (300 s) could close one under a check on its way.
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "60s"},
            "explicit_http_config": {"http_protocol_options": {}},
        }
    }
    if opts.token:
        _protocol_options(cluster)["http_filters"] = token_filters(opts.token)
    cluster["load_assignment"]["cluster_name"] = AUTHZ_CLUSTER
    for lb in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]:  # every replica, its authz port
        lb["endpoint"]["address"]["socket_address"]["port_value"] = opts.authz_http_port
    return cluster


def _xds_addresses(opts: BootstrapOptions) -> list[tuple[str, int]]:
    return [(opts.xds_host, opts.xds_port), *opts.xds_more]


def _several(opts: BootstrapOptions) -> bool:
    """More than one replica may be behind the xDS cluster."""
    return bool(opts.xds_more) or not _is_ip(opts.xds_host)


def _xds_cluster(opts: BootstrapOptions) -> dict[str, Any]:
    addresses = _xds_addresses(opts)
    cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        "type": "STATIC" if all(_is_ip(h) for h, _ in addresses) else "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {"connection_keepalive": {"interval": "30s", "timeout": "5s"}}
                },
            }
        },
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                        for host, port in addresses
                    ]
                }
            ],
        },
    }
    if _several(opts):
        # Several replicas (or a DNS name, which may have an address per replica): a replica that
        # refuses connections is set aside at its first failure, so the next attempt goes to another.
        cluster["outlier_detection"] = {"split_external_local_origin_errors": True,
                                        "consecutive_local_origin_failure": 1, "max_ejection_percent": 100,
                                        "base_ejection_time": "5s", "interval": "1s"}
    socket = _tls_socket(opts)
    if socket is not None:
        cluster["transport_socket"] = socket
    if opts.token:
        # Every request on this cluster carries the node's token: the xDS streams (beside their
        # initial metadata) and the ext_authz checks that the pushed listeners send over it.
        _protocol_options(cluster)["http_filters"] = token_filters(opts.token)
    return cluster


def _protocol_options(cluster: dict[str, Any]) -> dict[str, Any]:
    return cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]  # type: ignore[no-any-return]


def token_filters(token: str) -> list[dict[str, Any]]:
    """Upstream HTTP filters that set ``x-xdsd-token`` on every request to the cluster (replacing
    any value that came from elsewhere)."""
    return [
        {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                "mutations": {"request_mutations": [{"append": {
                    "header": {"key": TOKEN_HEADER, "value": token},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }}]},
            },
        },
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"},
        },
    ]


def _tls_socket(opts: BootstrapOptions) -> dict[str, Any] | None:
    """TLS to xdsd, verifying its certificate chain and its name (a certificate of the same CA with
    another name, such as a sidecar's SVID, is refused)."""
    if opts.xds_plaintext:
        return None
    if opts.xds_tls_ca_pem is not None:
        trusted: dict[str, Any] = {"inline_string": opts.xds_tls_ca_pem.decode()}
        name = opts.xds_tls_server_name or SERVER_NAME
    elif opts.xds_tls_ca:
        trusted = {"filename": opts.xds_tls_ca}
        name = opts.xds_tls_server_name or opts.xds_host
    else:
        raise ValueError("TLS to xdsd needs its CA bundle (xds_tls_ca or xds_tls_ca_pem), or xds_plaintext")
    validation: dict[str, Any] = {"trusted_ca": trusted}
    tls: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {"validation_context": validation},
    }
    if _is_ip(name):
        validation["match_typed_subject_alt_names"] = [{"san_type": "IP_ADDRESS", "matcher": {"exact": name}}]
    else:
        validation["match_typed_subject_alt_names"] = [{"san_type": "DNS", "matcher": {"exact": name}}]
        tls["sni"] = name
    return {"name": "envoy.transport_sockets.tls", "typed_config": tls}


# YAML 1.1 reads these plain scalars as booleans; PyYAML (which quotes the ones its own resolver
# would misread) leaves y, n and their capitals plain, and Envoy's YAML reader takes them as false/true.
_YAML11_BOOLEANS = frozenset({"y", "Y", "n", "N"})


class _Dumper(yaml.SafeDumper):
    """safe_dump, with strings that any YAML 1.1 reader could take for a boolean quoted."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if value in _YAML11_BOOLEANS:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="'")
    return dumper.represent_str(value)


_Dumper.add_representer(str, _str)


def render_text(opts: BootstrapOptions, fmt: str = "yaml") -> str:
    data = render(opts)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)
