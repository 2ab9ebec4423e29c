"""Pushes and ACKs are counted in plain numbers and exposed when scraped: the exposition is what
prometheus_client's own Counter and Histogram would give for the same observations."""

from __future__ import annotations

import random
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from xdsd import typeurls
from xdsd.observability.metrics import _LATENCY_BUCKETS, Metrics
from xdsd.server.observer import FanOut, NackObserver


def _samples(text: bytes, prefixes: tuple[str, ...]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name.startswith(prefixes) and not sample.name.endswith("_created"):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_pushes_and_acks_expose_what_prometheus_client_would() -> None:
    metrics = Metrics()
    reference = CollectorRegistry()
    pushes = Counter("xdsd_pushes", "", ["type"], registry=reference)
    push_bytes = Counter("xdsd_push_bytes", "", ["type"], registry=reference)
    push_resources = Counter("xdsd_push_resources", "", ["type"], registry=reference)
    acks = Counter("xdsd_acks", "", ["type"], registry=reference)
    push_latency = Histogram("xdsd_push_latency_seconds", "", ["type"], buckets=_LATENCY_BUCKETS, registry=reference)
    ack_latency = Histogram("xdsd_ack_latency_seconds", "", ["type"], buckets=_LATENCY_BUCKETS, registry=reference)
    stream = SimpleNamespace()
    rnd = random.Random(3)
    for _ in range(2000):
        type_url = rnd.choice([typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER])
        t = typeurls.short(type_url)
        # Bounds themselves included: a bucket holds the values up to and including its bound.
        latency = rnd.choice([*_LATENCY_BUCKETS, 0.0, 30.0, rnd.random() * 3])
        size, count = rnd.randrange(1000), rnd.randrange(10)
        metrics.response_sent(stream, type_url, "v", size, count, latency)  # type: ignore[arg-type]
        pushes.labels(t).inc()
        push_bytes.labels(t).inc(size)
        push_resources.labels(t).inc(count)
        push_latency.labels(t).observe(latency)
        if rnd.random() < 0.7:
            acked = rnd.choice([None, latency])
            metrics.ack(stream, type_url, "v", acked)  # type: ignore[arg-type]
            acks.labels(t).inc()
            if acked is not None:
                ack_latency.labels(t).observe(acked)
    prefixes = ("xdsd_pushes", "xdsd_push_", "xdsd_acks", "xdsd_ack_")
    ours = _samples(metrics.render(), prefixes)
    theirs = _samples(generate_latest(reference), prefixes)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert abs(ours[key] - value) < 1e-6, key


def test_fan_out_skips_observers_that_leave_a_hook_empty() -> None:
    metrics = Metrics()
    seen: list[str] = []
    fan = FanOut(metrics, NackObserver(lambda *args: seen.append("nack")))
    assert fan.ack == metrics.ack  # NackObserver does nothing on ACKs: metrics alone, no wrapper
    stream = SimpleNamespace(group=None, node_id="n")
    fan.nack(stream, typeurls.CLUSTER, "v", "bad")  # type: ignore[arg-type]
    assert seen == ["nack"]
