"""Envoy's ext_proc filter for the mesh's ``processing:`` steps, pointing at xdsd.

The filter calls xdsd over gRPC on the node's own xDS cluster (whose requests carry the node's
token, like ext_authz's); the stream's initial metadata names the step (``x-xdsd-processing``).
Sidecars: one filter on the inbound listener, after ext_authz. Gateways: one filter per route with
a step, disabled in the listener and enabled by that route (``typed_per_filter_config``)."""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2 as _rc
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from xdsd.model import Gateway
from xdsd.model.processing import PROCESSING_METADATA, Processing, route_step_path, service_step_path
from xdsd.node import NodeGroup

EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
# Envoy waits this much longer than the step's timeout, so that the answer for a processor that
# timed out is xdsd's (its failure mode, logged and counted), not Envoy's own.
GRACE_SECONDS = 0.25
# Where a verified JWT's claims are in the request's dynamic metadata (forwarded to the processor).
CLAIMS_NAMESPACE = "envoy.filters.http.jwt_authn"

_Mode = processing_mode_pb2.ProcessingMode
_BODY = {"none": _Mode.NONE, "buffered": _Mode.BUFFERED, "streamed": _Mode.STREAMED}


def processing_mode(step: Processing) -> processing_mode_pb2.ProcessingMode:
    """What Envoy sends: the listed phases, bodies in the step's body mode, never trailers."""
    mode = _Mode()
    phases = set(step.phases)
    mode.request_header_mode = _Mode.SEND if "request_headers" in phases else _Mode.SKIP
    mode.response_header_mode = _Mode.SEND if "response_headers" in phases else _Mode.SKIP
    body = _BODY[step.body_mode]
    mode.request_body_mode = body if "request_body" in phases else _Mode.NONE  # type: ignore[assignment]
    mode.response_body_mode = body if "response_body" in phases else _Mode.NONE  # type: ignore[assignment]
    mode.request_trailer_mode = _Mode.SKIP
    mode.response_trailer_mode = _Mode.SKIP
    return mode


def ext_proc_filter(group: NodeGroup, key: str, step: Processing, name: str = EXT_PROC_FILTER,
                    disabled: bool = False) -> hcm_pb2.HttpFilter:
    config = ext_proc_pb2.ExternalProcessor(failure_mode_allow=step.failure == "open",
                                            processing_mode=processing_mode(step))
    config.grpc_service.envoy_grpc.cluster_name = group.xds_cluster
    config.grpc_service.initial_metadata.add(key=PROCESSING_METADATA, value=key)
    config.message_timeout.FromNanoseconds(int(round((step.timeout + GRACE_SECONDS) * 1e9)))
    config.metadata_options.forwarding_namespaces.untyped.append(CLAIMS_NAMESPACE)
    f = hcm_pb2.HttpFilter(name=name, disabled=disabled)
    f.typed_config.Pack(config)
    return f


def service_filter(group: NodeGroup, service: str, step: Processing) -> hcm_pb2.HttpFilter:
    """The inbound listener's filter for ``services.<service>.processing``."""
    return ext_proc_filter(group, step.key(service_step_path(service)), step)


def route_filter_name(index: int) -> str:
    return f"{EXT_PROC_FILTER}.routes[{index}]"


def gateway_filters(name: str, gateway: Gateway, group: NodeGroup) -> list[hcm_pb2.HttpFilter]:
    """One disabled filter per gateway route with a step (its route enables it: ``enable``)."""
    return [ext_proc_filter(group, route.processing.key(route_step_path(name, i)), route.processing,
                            name=route_filter_name(i), disabled=True)
            for i, route in enumerate(gateway.routes) if route.processing is not None]


# Processors that must read response bodies as the app wrote them: their routes drop the client's
# accept-encoding, so that the app does not compress (json-redact refuses a compressed body, 502).
IDENTITY_RESPONSES = frozenset({"json-redact"})


def wants_identity_responses(step: Processing | None) -> bool:
    return step is not None and step.processor in IDENTITY_RESPONSES and "response_body" in step.phases


def enable(route: _rc.Route, index: int, step: Processing | None = None) -> None:
    """Turn on the gateway route's own filter (disabled in the listener for every other route)."""
    if wants_identity_responses(step):
        route.request_headers_to_remove.append("accept-encoding")
    per_route = ext_proc_pb2.ExtProcPerRoute()
    per_route.overrides.SetInParent()
    config = _rc.FilterConfig(disabled=False)
    config.config.Pack(per_route)
    route.typed_per_filter_config[route_filter_name(index)].Pack(config)
