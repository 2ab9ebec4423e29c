"""Finding and building the processor a mesh names.

A name is a built-in (``set-headers``, ``json-redact``, ``json-schema``), an entry point in the
``xdsd.processors`` group (a package declares ``[project.entry-points."xdsd.processors"]
my-filter = "my_pkg.filters:my_filter"``), or ``module:attribute`` (imported from ``sys.path``; the
working directory of ``xdsd serve`` is on it). A module is imported the first time a mesh names it
(and kept: editing its source needs a restart). Every failure is a ``ProcessorError`` whose text is
the reason, reported by the model as a field-path error.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from xdsd.processing.api import Message, Processor, Result

ENTRY_POINT_GROUP = "xdsd.processors"

BUILTINS: dict[str, str] = {
    "set-headers": "xdsd.processing.builtins:SetHeaders",
    "json-redact": "xdsd.processing.builtins:JsonRedact",
    "json-schema": "xdsd.processing.builtins:JsonSchema",
}

_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")
_REFERENCE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

Callable_ = Callable[[Message], "Result | None"]


class ProcessorError(ValueError):
    """A processor that cannot be found, imported or built with its arguments (``field``: which of
    the mesh's fields is wrong, ``processor`` or ``args``)."""

    def __init__(self, message: str, field: str = "processor") -> None:
        super().__init__(message)
        self.field = field


def check_reference(value: str) -> str:
    """The syntax of a processor name (the model's field validator): a name or ``module:attribute``."""
    if ":" in value:
        if not _REFERENCE_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a 'module:attribute' reference")
    elif not _NAME_RE.fullmatch(value):
        raise ValueError(f"{value!r} is neither a processor name (lower-case letters, digits, '.', '_', '-') "
                         "nor a 'module:attribute' reference")
    return value


@functools.lru_cache(maxsize=256)
def resolve(reference: str) -> object:
    """The object a processor name refers to (imported once; failures are not cached)."""
    target = BUILTINS.get(reference)
    if target is None and ":" not in reference:
        found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=reference)
        if not found:
            known = sorted({*BUILTINS, *(e.name for e in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))})
            raise ProcessorError(f"unknown processor {reference!r} (known: {', '.join(known)}; "
                                 f"or 'module:function')")
        target = next(iter(found)).value
    module_name, _, attribute = (target or reference).partition(":")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, SyntaxError, anything the module raises at import
        raise ProcessorError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ProcessorError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(obj):
        raise ProcessorError(f"{reference!r} is a {type(obj).__name__}, not a callable")
    return obj


def build(reference: str, args: Mapping[str, Any]) -> Callable_:
    """The callable to run per phase: a ``Processor`` subclass built with ``args``, or the function."""
    obj = resolve(reference)
    if inspect.isclass(obj):
        if not issubclass(obj, Processor):
            raise ProcessorError(f"{reference!r} is a class that is not a subclass of xdsd.processing.Processor")
        try:
            return obj(args)
        except KeyError as exc:
            raise ProcessorError(f"missing argument {exc}", "args") from None
        except (ValueError, TypeError) as exc:
            raise ProcessorError(str(exc), "args") from None
        except Exception as exc:
            raise ProcessorError(f"cannot be built: {type(exc).__name__}: {exc}", "args") from None
    return obj  # type: ignore[return-value]
