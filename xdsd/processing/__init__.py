"""Envoy filters written in Python: the processor API (``api``), how a processor named in the mesh
is found and built (``loader``) and the built-in processors (``builtins``). Nothing here runs at
import time; a processor's module is imported when a mesh names it."""

from __future__ import annotations

from xdsd.processing.api import (
    PHASES,
    Continue,
    Headers,
    Message,
    Mutate,
    Phase,
    Processor,
    ReplaceBody,
    Respond,
    Result,
)

__all__ = ["PHASES", "Continue", "Headers", "Message", "Mutate", "Phase", "Processor", "ReplaceBody", "Respond",
           "Result"]
