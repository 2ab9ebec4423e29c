"""Envoy's external processing service (``envoy.service.ext_proc.v3.ExternalProcessor/Process``).

Envoy opens one bidirectional stream per HTTP request and sends each phase it was configured to
send (request headers, request body, response headers, response body); every message gets exactly
one answer for that phase. Which processing step a stream is for comes in its initial metadata
(``x-xdsd-processing``, written by the generators); only nodes of the step's gateway or service may
run it (their node token, like ext_authz).

The processor runs in a worker thread or a worker process (``runner``), with the step's timeout,
when the ``admission`` lets it in (each owner has a bounded share of the pool and a bounded line).
A processor that raises or times out, or a phase refused by the admission, gets the step's failure
mode: ``closed`` answers the client 500 (raised), 504 (timed out) or 503 (overloaded); ``open`` lets
the phase pass untouched. Either way it is logged and counted; the stream is never ended with a
gRPC error for it (Envoy would apply its own failure mode without a reason).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from xdsd.auth.access import Access, Denied, token_from_metadata
from xdsd.auth.tokens import NODE
from xdsd.extproc.admission import Admission
from xdsd.extproc.phase import StepSpec, StreamState, continue_, immediate
from xdsd.extproc.runner import Outcome, ProcessRunner, Runner, ThreadRunner
from xdsd.model import Mesh
from xdsd.model.processing import PROCESSING_METADATA, Processing, processing_steps
from xdsd.processing.api import Message, Phase, Respond
from xdsd.processing.loader import ProcessorError, build

log = logging.getLogger(__name__)

# (processor, phase, outcome ok | error | timeout, seconds): metrics attach here.
ProcessingObserver = Callable[[str, str, str, float], None]
# Opens a span from the call's metadata (traceparent); None: tracing is off.
SpanFactory = Callable[[Any], Any]

# A processor's failure is logged at most this often (per step); every one is counted.
LOG_INTERVAL = 5.0
# failure: closed — the client's answer per outcome.
_FAILED = {"error": (500, "failed"), "timeout": (504, "timed out"), "overloaded": (503, "overloaded")}


@dataclass(slots=True)
class Step:
    owner: str  # the gateway or service whose nodes may run it
    path: str  # its field path in the mesh
    spec: Processing
    run: Callable[[Message], Any]  # built here (thread workers); worker processes build their own
    worker: StepSpec
    last_log: float = 0.0


class ProcessingServicer(external_processor_pb2_grpc.ExternalProcessorServicer):
    def __init__(self, runner: Runner | None = None, observer: ProcessingObserver | None = None,
                 span: SpanFactory | None = None, access: Access | None = None,
                 admission: Admission | None = None) -> None:
        self.runner: Runner = runner or ThreadRunner()
        self.admission = admission or Admission(self.runner.workers)
        self.access = access
        self._observer = observer
        self._span = span
        self._steps: dict[str, Step] = {}
        self._previous: dict[str, Step] = {}  # streams opened under the last revision finish on it

    def set_mesh(self, mesh: Mesh, *also: Mesh) -> None:
        """Build the mesh's processing steps (each processor once; unchanged steps are kept).
        ``also``: meshes some nodes are served at the same time (a staged rollout's candidate)."""
        steps: dict[str, Step] = {}
        for served in (mesh, *also):
            for owner, path, spec in processing_steps(served):
                key = spec.key(path)
                old = steps.get(key) or self._steps.get(key) or self._previous.get(key)
                if old is not None:
                    steps[key] = old
                    continue
                try:
                    run = build(spec.processor, spec.args)
                except ProcessorError as exc:  # validated already; only a module changed on disk gets here
                    log.error("%s: processor %r: %s", path, spec.processor, exc)
                    continue
                service = served.services.get(owner)
                worker = StepSpec(key, spec.processor, spec.args,
                                  identity=service is not None and service.sidecar is not None,
                                  buffered=spec.body_mode == "buffered")
                steps[key] = Step(owner, path, spec, run, worker)
        self._previous, self._steps = self._steps, steps
        if steps and isinstance(self.runner, ProcessRunner):
            self.runner.start()

    async def ready(self) -> None:
        """Until the worker processes are up (xdsd's start-up waits for them before opening its
        ports, so that no first request times out behind a spawn)."""
        if isinstance(self.runner, ProcessRunner):
            await self.runner.ready()

    def close(self) -> None:
        self.runner.close()

    async def Process(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ep.ProcessingResponse]:
        metadata = context.invocation_metadata() or ()
        key = next((str(v) for k, v in metadata if k == PROCESSING_METADATA), "")
        step = self._steps.get(key) or self._previous.get(key)
        if self.access is not None and self.access.required:
            # Who calls is checked before whether the step exists: another owner's step key and an
            # unknown one get the same answer (no oracle for which steps, or owners, there are).
            try:
                caller = self.access.caller(token_from_metadata(metadata))
                if caller.kind != NODE:
                    raise Denied("not-a-node", "this needs a node token, not an operator token",
                                 unauthenticated=False)
            except Denied as exc:
                code = grpc.StatusCode.UNAUTHENTICATED if exc.unauthenticated else grpc.StatusCode.PERMISSION_DENIED
                await context.abort(code, f"xdsd: {exc}")
                return
            if step is None or step.owner != caller.cluster:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"xdsd: {caller.cluster!r} has no processing step {key[:200]!r}")
                return
        if step is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"xdsd: no processing step {key[:200]!r} in the mesh")
            return
        stream = StreamState()
        async for request in request_iterator:
            yield await self._phase(step, stream, request, metadata)

    async def _phase(self, step: Step, stream: StreamState, request: ep.ProcessingRequest,
                     metadata: Any) -> ep.ProcessingResponse:
        which = request.WhichOneof("request")
        if which not in step.spec.phases:  # trailers, or a phase this step does not process
            return continue_(which or "request_headers")
        phase: Phase = which  # type: ignore[assignment]
        start = time.perf_counter()
        admitted = await self.admission.enter(step.owner, step.spec.timeout)
        if admitted != "ok":  # the owner's share of the pool and its line are full, or its turn came too late
            outcome = Outcome(admitted, None, time.perf_counter() - start)
        else:
            owner = step.owner
            outcome = await self.runner.phase(step.run, step.worker, stream, phase, request,
                                              max(step.spec.timeout - (time.perf_counter() - start), 0.001),
                                              lambda: self.admission.leave(owner))
            outcome = Outcome(outcome.kind, outcome.value, time.perf_counter() - start)
        if outcome.kind == "ok":
            response: ep.ProcessingResponse = outcome.value[0]
            new_state: StreamState = outcome.value[1]
            if new_state is not stream:  # from a worker process: carry what it saw to the next phase
                stream.request, stream.response = new_state.request, new_state.response
                stream.caller, stream.claims = new_state.caller, new_state.claims
        else:
            response = self._failed(step, phase, outcome)
        self._record(step, phase, outcome, metadata)
        return response

    def _failed(self, step: Step, phase: Phase, outcome: Outcome) -> ep.ProcessingResponse:
        now = time.monotonic()
        if now - step.last_log >= LOG_INTERVAL:
            step.last_log = now
            if outcome.kind == "timeout":
                log.warning("%s: processor %r timed out after %.3fs (%s, failure %s)", step.path,
                            step.spec.processor, step.spec.timeout, phase, step.spec.failure)
            elif outcome.kind == "overloaded":
                log.warning("%s: processor %r not run: %r has %d phases in the worker pool and its line is full "
                            "(%s, failure %s)", step.path, step.spec.processor, step.owner,
                            self.admission.in_pool(step.owner), phase, step.spec.failure)
            else:
                exc = outcome.value
                log.warning("%s: processor %r raised in %s (failure %s): %s: %s", step.path, step.spec.processor,
                            phase, step.spec.failure, type(exc).__name__, exc, exc_info=exc)
        if step.spec.failure == "open":
            return continue_(phase)
        status, what = _FAILED[outcome.kind]
        return immediate(Respond(status, f"xdsd: processor {step.spec.processor} {what}\n",
                                  {"content-type": "text/plain", PROCESSING_METADATA: outcome.kind}))

    def _record(self, step: Step, phase: Phase, outcome: Outcome, metadata: Any) -> None:
        if self._observer is not None:
            self._observer(step.spec.processor, phase, outcome.kind, outcome.seconds)
        if self._span is not None:
            try:
                span = self._span(metadata)
                span.set_attributes({"xdsd.processing.processor": step.spec.processor,
                                     "xdsd.processing.step": step.path, "xdsd.processing.phase": phase,
                                     "xdsd.processing.outcome": outcome.kind,
                                     "xdsd.processing.seconds": outcome.seconds})
                span.end()
            except Exception:  # tracing must never change an answer
                log.debug("processing span failed", exc_info=True)


