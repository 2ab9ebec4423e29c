"""A request body of the registration HTTP API, from bytes to a JSON object, refusing anything that
could hurt the parser or the store: at most ``MAX_BODY`` bytes, strict UTF-8, nested at most
``MAX_DEPTH`` deep (measured before parsing, without recursion), no NaN/Infinity, no integer
literal longer than ``MAX_INT_DIGITS`` digits (named by field afterwards), no lone surrogates
(``"\\ud800"`` escapes) in any key or string."""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

from xdsd.errors import FieldError
from xdsd.registry.instance import BigInt, RegistrationError, unencodable

MAX_BODY = 64 * 1024
# A registration is 2 deep (the body, its labels); the bound leaves room and stays far below
# the recursion json.loads can take.
MAX_DEPTH = 32
# Longer integer literals are kept as text (so the field rules name the field), never converted:
# int() of a long digit string is quadratic, and refused past 4300 digits.
MAX_INT_DIGITS = 64

# A JSON string, escapes included (an unterminated one runs to the end of the text).
_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_BRACKET_RE = re.compile(r"[\[\]{}]")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class BodyTooLarge(RegistrationError):
    """HTTP 413."""


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in ``text`` (JSON or not), brackets inside strings not
    counted. Regex and C-level loops only: no recursion, no per-character Python code."""
    brackets = _BRACKET_RE.findall(_STRING_RE.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _parse_int(digits: str) -> int | BigInt:
    return int(digits) if len(digits.lstrip("-")) <= MAX_INT_DIGITS else BigInt(digits)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``, or RegistrationError (BodyTooLarge) naming what is wrong."""
    if len(raw) > MAX_BODY:
        raise BodyTooLarge([FieldError("body", f"larger than {MAX_BODY} bytes")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RegistrationError([FieldError("body", f"not valid UTF-8 (at byte {exc.start})")]) from None
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        raise RegistrationError([FieldError("body", f"nested deeper than {MAX_DEPTH} levels")])
    try:
        data = json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise RegistrationError([FieldError("body", f"not valid JSON: {_short(exc)}")]) from None
    if not isinstance(data, dict):
        raise RegistrationError([FieldError("body", "must be a JSON object")])
    errors = unencodable(data)
    if errors:
        raise RegistrationError(errors)
    return data


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."
