"""Client Status Discovery Service (``envoy.service.status.v3.ClientStatusDiscoveryService``):
what xdsd serves each connected node, per resource, with its version and sync status, so standard
tooling can ask "has every proxy accepted the config I pushed?"."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from xdsd.redact import redacted_any
from xdsd.server.stream import Stream
from xdsd.server.subscriptions import NACKED, NOT_SENT, STALE, SYNCED, DeltaState, sync_state
from xdsd.server.xds import XdsServer

_STATUS = csds_pb2.ConfigStatus
_CLIENT = config_dump_shared_pb2.ClientResourceStatus
# sync_state -> (what xdsd knows of the config, what the client did with it)
_CSDS = {
    SYNCED: (_STATUS.SYNCED, _CLIENT.ACKED),
    STALE: (_STATUS.STALE, _CLIENT.REQUESTED),
    NACKED: (_STATUS.ERROR, _CLIENT.NACKED),
    NOT_SENT: (_STATUS.NOT_SENT, _CLIENT.REQUESTED),
}


def _matches(req: csds_pb2.ClientStatusRequest, node_id: str) -> bool:
    if not req.node_matchers:
        return True
    for m in req.node_matchers:
        which = m.node_id.WhichOneof("match_pattern")
        if which is None:
            return True
        if which == "exact" and m.node_id.exact == node_id:
            return True
        if which == "prefix" and node_id.startswith(m.node_id.prefix):
            return True
    return False


def client_config(streams: list[Stream]) -> csds_pb2.ClientConfig:
    first = streams[0]
    cfg = csds_pb2.ClientConfig()
    assert first.node is not None
    cfg.node.CopyFrom(first.node)
    for stream in streams:
        snap = stream.snapshot
        for type_url, st in stream.states.items():
            ts = snap.get(type_url) if snap is not None else None
            held = st.client if isinstance(st, DeltaState) else st.sent
            names = set(held) | (set(ts.resources) if ts is not None and st.wildcard else set())
            names |= {n for n in st.names if ts is not None and n in ts.resources}
            for name in sorted(names):
                res = ts.resources.get(name) if ts is not None else None
                g = cfg.generic_xds_configs.add(type_url=type_url, name=name)
                sent_version = held.get(name)
                if res is not None:
                    g.version_info = res.version
                    # Never a private key: CSDS is an operator's view, not the node's own SDS.
                    g.xds_config.CopyFrom(redacted_any(type_url, res.body))
                state = sync_state(st, sent_version is not None, res is None or sent_version == res.version)
                g.config_status, g.client_status = _CSDS[state]
                if state == STALE and st.acked_version:
                    g.client_status = _CLIENT.ACKED  # it runs an older version it acknowledged
                if state == NACKED:
                    g.error_state.details = st.nack_error or ""
    return cfg


class ClientStatusServicer(csds_pb2_grpc.ClientStatusDiscoveryServiceServicer):
    def __init__(self, server: XdsServer) -> None:
        self.server = server

    def _response(self, req: csds_pb2.ClientStatusRequest) -> csds_pb2.ClientStatusResponse:
        out = csds_pb2.ClientStatusResponse()
        for node_id, streams in sorted(self.server.nodes.items()):
            live = [s for s in streams if s.node is not None]
            if live and _matches(req, node_id):
                out.config.append(client_config(sorted(live, key=lambda s: s.id)))
        return out

    async def FetchClientStatus(  # noqa: N802 - gRPC method name
        self, request: csds_pb2.ClientStatusRequest, context: grpc.aio.ServicerContext
    ) -> csds_pb2.ClientStatusResponse:
        return self._response(request)

    async def StreamClientStatus(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[csds_pb2.ClientStatusRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[csds_pb2.ClientStatusResponse]:
        async for request in request_iterator:
            yield self._response(request)
