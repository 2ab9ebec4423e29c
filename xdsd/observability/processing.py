"""Prometheus metrics of the external processing service, per processor (the name in the mesh)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ProcessingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.calls = Counter("xdsd_processor_calls", "Processor calls (one per processed phase of a request)",
                             ["processor", "phase"], registry=r)
        self.errors = Counter("xdsd_processor_errors", "Processor calls that raised (answered by the failure mode)",
                              ["processor"], registry=r)
        self.timeouts = Counter("xdsd_processor_timeouts",
                                "Processor calls that exceeded their timeout (answered by the failure mode)",
                                ["processor"], registry=r)
        self.overloaded = Counter("xdsd_processor_overloaded",
                                  "Processor calls not run: the owner's share of the worker pool and its line were "
                                  "full (answered by the failure mode)", ["processor"], registry=r)
        self.latency = Histogram("xdsd_processor_seconds",
                                 "Time from a phase reaching xdsd to its answer (queueing in the worker pool included)",
                                 ["processor"], buckets=_BUCKETS, registry=r)

    def observe(self, processor: str, phase: str, outcome: str, seconds: float) -> None:
        """The servicer's observer: processor names come from the mesh, never from the caller."""
        self.calls.labels(processor, phase).inc()
        if outcome == "error":
            self.errors.labels(processor).inc()
        elif outcome == "timeout":
            self.timeouts.labels(processor).inc()
        elif outcome == "overloaded":
            self.overloaded.labels(processor).inc()
        self.latency.labels(processor).observe(seconds)
