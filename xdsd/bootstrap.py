"""Envoy bootstrap files that point a stock Envoy at xdsd (``xdsd bootstrap``)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

import yaml

XDS_CLUSTER = "xds_cluster"


@dataclass(frozen=True, slots=True)
class BootstrapOptions:
    node_id: str
    cluster: str
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000
    admin_address: str = "127.0.0.1"
    admin_port: int = 9901
    ads: bool = True
    delta: bool = False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _api_config_source(opts: BootstrapOptions) -> dict[str, Any]:
    return {
        "api_type": "DELTA_GRPC" if opts.delta else "GRPC",
        "transport_api_version": "V3",
        "grpc_services": [
            {
                "envoy_grpc": {
                    "cluster_name": XDS_CLUSTER,
                    # Reconnect quickly after a control-plane restart; Envoy keeps serving its last
                    # config meanwhile.
                    "retry_policy": {"retry_back_off": {"base_interval": "0.25s", "max_interval": "5s"}},
                }
            }
        ],
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
    return {
        "node": {"id": opts.node_id, "cluster": opts.cluster},
        "admin": {"address": {"socket_address": {"address": opts.admin_address, "port_value": opts.admin_port}}},
        "dynamic_resources": dynamic,
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": "STATIC" if _is_ip(opts.xds_host) else "STRICT_DNS",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {
                                "http2_protocol_options": {
                                    "connection_keepalive": {"interval": "30s", "timeout": "5s"}
                                }
                            },
                        }
                    },
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": opts.xds_host,
                                                    "port_value": opts.xds_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }


def render_text(opts: BootstrapOptions, fmt: str = "yaml") -> str:
    data = render(opts)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False)
