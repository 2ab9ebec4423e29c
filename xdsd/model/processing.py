"""``processing:``: an Envoy external-processing (ext_proc) step run by a Python processor in xdsd,
on a gateway route or on a service's inbound side (its sidecars).

Whether the named processor exists, imports and accepts its ``args`` is checked with the rest of
the mesh (``crosscheck``): a missing module is a field-path error, never a crash later."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, Field, StrictStr

from xdsd.errors import FieldError
from xdsd.model.base import FrozenModel
from xdsd.model.fields import PositiveDuration
from xdsd.processing.loader import ProcessorError, build, check_reference

if TYPE_CHECKING:
    from xdsd.model.mesh import Mesh

Phase = Literal["request_headers", "request_body", "response_headers", "response_body"]
BodyMode = Literal["none", "buffered", "streamed"]

# Header of the gRPC stream Envoy opens per request: which processing step it is for.
PROCESSING_METADATA = "x-xdsd-processing"
# The longest a processor may take per phase.
MAX_TIMEOUT = 60.0


class Processing(FrozenModel):
    """One processing step: ``processor`` (a built-in, an entry point of the ``xdsd.processors``
    group or ``module:function``) with ``args``, run on ``phases``; ``body`` is how body phases get
    the body (``buffered``: whole, up to Envoy's buffer limit; ``streamed``: chunk by chunk);
    ``timeout`` per phase; ``failure``: what a processor that raises or times out (or an xdsd that
    cannot be reached) does to the request: ``closed`` refuses it (5xx), ``open`` lets it pass
    untouched."""

    processor: Annotated[StrictStr, AfterValidator(check_reference)]
    args: dict[StrictStr, Any] = Field(default_factory=dict)
    phases: list[Phase] = Field(default_factory=lambda: ["request_headers"], min_length=1)
    body: BodyMode | None = None  # default: buffered when a body phase is listed, else none
    timeout: PositiveDuration = 0.2
    failure: Literal["closed", "open"] = "closed"

    @property
    def body_mode(self) -> BodyMode:
        if self.body is not None:
            return self.body
        return "buffered" if any(p.endswith("_body") for p in self.phases) else "none"

    def key(self, path: str) -> str:
        """What Envoy sends xdsd (``PROCESSING_METADATA``) to say which step a stream is for: the
        step's field path and a digest of its content (a stream opened under an earlier revision
        never runs a changed step under the old name)."""
        content = json.dumps(self.model_dump(mode="json"), sort_keys=True, default=str)
        return f"{path}#{hashlib.sha256(content.encode()).hexdigest()[:12]}"


def service_step_path(service: str) -> str:
    return f"services.{service}.processing"


def route_step_path(gateway: str, index: int) -> str:
    return f"gateways.{gateway}.routes[{index}].processing"


def processing_steps(mesh: Mesh) -> list[tuple[str, str, Processing]]:
    """Every processing step of the mesh: (owner, field path, step). The owner is the gateway or the
    service whose nodes run it (the only callers allowed to ask xdsd to run it)."""
    steps: list[tuple[str, str, Processing]] = []
    for name, service in mesh.services.items():
        if service.processing is not None:
            steps.append((name, service_step_path(name), service.processing))
    for name, gateway in mesh.gateways.items():
        for i, route in enumerate(gateway.routes):
            if route.processing is not None:
                steps.append((name, route_step_path(name, i), route.processing))
    return steps


def check_processing(mesh: Mesh) -> list[FieldError]:
    """Phases and body mode agree; the processor is found, imports and takes its ``args``."""
    errors: list[FieldError] = []
    for _, path, step in processing_steps(mesh):
        body_phases = [p for p in step.phases if p.endswith("_body")]
        if len(set(step.phases)) != len(step.phases):
            errors.append(FieldError(f"{path}.phases", "a phase is listed twice"))
        if body_phases and step.body_mode == "none":
            errors.append(FieldError(f"{path}.body", f"phase {body_phases[0]} needs body: buffered or streamed"))
        if not body_phases and step.body_mode != "none":
            errors.append(FieldError(f"{path}.body", f"body: {step.body_mode} needs request_body or response_body "
                                                     "in phases"))
        if step.timeout > MAX_TIMEOUT:
            errors.append(FieldError(f"{path}.timeout", f"must be at most {MAX_TIMEOUT:g}s"))
        try:
            built = build(step.processor, step.args)
        except ProcessorError as exc:
            errors.append(FieldError(f"{path}.{exc.field}", str(exc)))
            continue
        if getattr(built, "needs_buffered_body", False) and step.body_mode != "buffered":
            errors.append(FieldError(f"{path}.body", f"processor {step.processor!r} reads whole bodies: "
                                                     "use body: buffered"))
        if getattr(built, "needs_body_headers", False):
            for body in body_phases:
                headers = body.replace("_body", "_headers")
                if headers not in step.phases:
                    errors.append(FieldError(f"{path}.phases", f"processor {step.processor!r} reads the headers of "
                                                               f"the bodies it is given: list {headers} with {body}"))
    return errors
