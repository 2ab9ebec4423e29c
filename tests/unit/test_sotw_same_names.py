"""State-of-the-world ACKs repeat the whole subscription; a stream recognizes a repeated one byte for
byte (Stream.on_sotw_data) instead of rebuilding a set of thousands of names. Whatever the requests,
a stream fed bytes must end in exactly the state, and send exactly the responses, of a stream fed
the parsed messages."""

from __future__ import annotations

import random

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from xdsd import typeurls
from xdsd.cache import SnapshotCache
from xdsd.generators import generate
from xdsd.model import load_mesh
from xdsd.server import stream as stream_module
from xdsd.server.observer import NullObserver
from xdsd.server.stream import ProtocolError, Stream

SERVICES = [f"s{i:03d}" for i in range(150)]


def _mesh_text() -> str:
    lines = ["gateways:", "  edge:", "    listen: {address: 127.0.0.1, port: 10000}", "    routes:"]
    lines += [f"      - {{prefix: /{s}, service: {s}}}" for s in SERVICES]
    lines += ["services:"]
    lines += [f"  {s}:\n    endpoints: [{{address: 10.0.{i // 250}.{i % 250 + 1}, port: 80}}]" for i, s in enumerate(SERVICES)]
    return "\n".join(lines) + "\n"


def _state(st: object) -> tuple[object, ...]:
    return tuple(getattr(st, k) if k != "sent" else dict(getattr(st, k)) for k in
                 ("requested", "must_respond", "wildcard", "names", "sent", "sent_version", "sent_nonce",
                  "acked_version", "acked_nonce", "nack_error", "nack_version", "ever_named"))


@pytest.mark.parametrize("seed", range(8))
def test_bytes_and_messages_give_the_same_streams(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(seed)
    cache = SnapshotCache(generate)
    cache.update(load_mesh(_mesh_text()))
    fast, plain = (Stream(cache, NullObserver(), delta=False, fixed_type=None, peer="p") for _ in range(2))
    hits = 0
    real = stream_module._same_subscription

    def counting(*args):  # type: ignore[no-untyped-def]
        nonlocal hits
        out = real(*args)
        hits += out is not None
        return out

    monkeypatch.setattr(stream_module, "_same_subscription", counting)
    node = base_pb2.Node(id="gw-1", cluster="edge")
    names = {t: [] for t in (typeurls.CLUSTER, typeurls.ENDPOINT)}
    names[typeurls.ENDPOINT] = sorted(rnd.sample(SERVICES, 100))
    first = True
    for step in range(120):
        type_url = rnd.choice([typeurls.CLUSTER, typeurls.ENDPOINT])
        st = fast.states.get(type_url)
        req = discovery_pb2.DiscoveryRequest(type_url=type_url)
        if first:
            req.node.CopyFrom(node)
            first = False
        elif rnd.random() < 0.05:
            req.node.CopyFrom(node)  # a client that sends its node every time
        op = rnd.random()
        if op < 0.15 and type_url == typeurls.ENDPOINT:  # a subscription change
            names[type_url] = sorted(rnd.sample(SERVICES, rnd.choice([3, 70, 100, 120])))
        if st is not None and st.sent_nonce:
            req.response_nonce = st.sent_nonce if rnd.random() < 0.9 else "0"  # now and then stale
            req.version_info = st.sent_version
            if rnd.random() < 0.1:
                req.error_detail.CopyFrom(status_pb2.Status(code=3, message=f"bad {step}"))
        req.resource_names.extend(names[type_url])
        data = req.SerializeToString()
        fast.on_sotw_data(data)
        plain.on_sotw_request(discovery_pb2.DiscoveryRequest.FromString(data))
        for t in (typeurls.CLUSTER, typeurls.ENDPOINT):
            if t in plain.states:
                assert _state(fast.states[t]) == _state(plain.states[t]), (step, t)
        got_fast = [(o.type_url, o.payload) for o in fast.responses()]
        got_plain = [(o.type_url, o.payload) for o in plain.responses()]
        assert got_fast == got_plain, step
        if rnd.random() < 0.1:  # an endpoint change: new snapshots for both
            cache.update(load_mesh(_mesh_text().replace("port: 80}", f"port: {80 + step}}}", 1)))
    assert hits > 5  # the byte-for-byte path was taken


def test_a_repeated_subscription_is_recognized_only_with_nothing_else_around_it() -> None:
    block_names = [f"n{i}" for i in range(100)]
    req = discovery_pb2.DiscoveryRequest(type_url=typeurls.ENDPOINT, resource_names=block_names, version_info="v1")
    block = discovery_pb2.DiscoveryRequest(type_url=typeurls.ENDPOINT, resource_names=block_names).SerializeToString()
    blocks = {typeurls.ENDPOINT: block}
    ack = discovery_pb2.DiscoveryRequest.FromString(req.SerializeToString())
    ack.response_nonce = "7"
    assert stream_module._same_subscription(ack.SerializeToString(), blocks) is not None
    more = discovery_pb2.DiscoveryRequest.FromString(ack.SerializeToString())
    more.resource_names.append("extra")  # one more name: the bytes differ
    assert stream_module._same_subscription(more.SerializeToString(), blocks) is None
    # A name appended after the block (a client that does not write in field order) is seen.
    trailing = ack.SerializeToString() + discovery_pb2.DiscoveryRequest(resource_names=["late"]).SerializeToString()
    assert stream_module._same_subscription(trailing, blocks) is None


def test_a_malformed_request_is_a_protocol_error() -> None:
    cache = SnapshotCache(generate)
    s = Stream(cache, NullObserver(), delta=False, fixed_type=None, peer="p")
    with pytest.raises(ProtocolError, match="malformed"):
        s.on_sotw_data(b"\x0a\xff\xff")
