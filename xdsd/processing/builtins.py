"""The built-in processors: ``set-headers``, ``json-redact``, ``json-schema``. Each is a
``Processor`` subclass that checks its arguments when the mesh is validated."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from xdsd.processing.api import Continue, Message, Mutate, Processor, ReplaceBody, Respond, Result

_HEADER_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]{1,256}")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def _keys(args: Mapping[str, Any], allowed: set[str], where: str) -> None:
    if not isinstance(args, Mapping):
        raise ValueError(f"{where}must be a mapping, got {type(args).__name__}")
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(f"{where}unknown argument {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _header_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not _HEADER_RE.fullmatch(name):
        raise ValueError(f"{where}{name!r} is not a lower-case HTTP header name")
    if name in ("host", "content-length"):
        raise ValueError(f"{where}{name!r} cannot be changed by set-headers")
    return name


# -- set-headers ------------------------------------------------------------------------------

_VARIABLE_RE = re.compile(r"\{([^{}]*)\}")
_VARIABLES = ("caller", "method", "path", "authority", "status")


class _Template:
    """``"{caller} via {header.x-forwarded-for}"``: variables ``caller``, ``method``, ``path``,
    ``authority``, ``status``, ``header.<name>`` (the request's header), ``claim.<name>`` (a
    verified JWT claim); ``{{`` and ``}}`` are literal braces. A missing value is empty."""

    def __init__(self, text: object, where: str) -> None:
        if not isinstance(text, str):
            raise ValueError(f"{where}must be a string, got {type(text).__name__}")
        self.parts: list[tuple[bool, str]] = []
        pos = 0
        escaped = text.replace("{{", "\x00").replace("}}", "\x01")
        for m in _VARIABLE_RE.finditer(escaped):
            self.parts.append((False, escaped[pos:m.start()]))
            name = m.group(1)
            if name not in _VARIABLES and not (
                    (name.startswith("header.") and _HEADER_RE.fullmatch(name[7:]))
                    or (name.startswith("claim.") and name[6:])):
                raise ValueError(f"{where}unknown variable {{{name}}} (use {', '.join(_VARIABLES)}, "
                                 "header.<name> or claim.<name>)")
            self.parts.append((True, name))
            pos = m.end()
        self.parts.append((False, escaped[pos:]))
        if any(not var and ("{" in s or "}" in s) for var, s in self.parts):
            raise ValueError(f"{where}unbalanced brace in {text!r} (write {{{{ or }}}} for a literal brace)")
        self.parts = [(var, s if var else s.replace("\x00", "{").replace("\x01", "}")) for var, s in self.parts]

    def render(self, message: Message) -> str:
        out: list[str] = []
        for var, s in self.parts:
            out.append(_UNSAFE.sub("", _value(s, message)) if var else s)
        return "".join(out)


def _value(name: str, message: Message) -> str:
    if name == "caller":
        return message.caller or ""
    if name == "status":
        return str(message.status or "")
    if name in ("method", "path", "authority"):
        return str(getattr(message, name))
    if name.startswith("header."):
        return message.request.get(name[7:], "")
    claim = (message.claims or {}).get(name[6:])
    return "" if claim is None else claim if isinstance(claim, str) else json.dumps(claim)


class _Edit:
    def __init__(self, args: object, where: str) -> None:
        if not isinstance(args, Mapping):
            raise ValueError(f"{where}must be a mapping with set, append, remove")
        _keys(args, {"set", "append", "remove"}, where)
        self.set = self._templates(args.get("set", {}), f"{where}set: ")
        self.append = self._templates(args.get("append", {}), f"{where}append: ")
        remove = args.get("remove", [])
        if not isinstance(remove, list):
            raise ValueError(f"{where}remove: must be a list of header names")
        self.remove = [_header_name(n, f"{where}remove: ") for n in remove]

    @staticmethod
    def _templates(value: object, where: str) -> dict[str, _Template]:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}must be a mapping of header name to value")
        return {_header_name(k, where): _Template(v, f"{where}{k}: ") for k, v in value.items()}

    def apply(self, message: Message) -> Mutate:
        return Mutate(set={k: t.render(message) for k, t in self.set.items()},
                      append={k: t.render(message) for k, t in self.append.items()}, remove=list(self.remove))


class SetHeaders(Processor):
    """``set-headers``: add, overwrite and remove headers of the request (``request:``) and of the
    response (``response:``), each ``{set: {name: template}, append: {...}, remove: [names]}``."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        super().__init__(args)
        _keys(args, {"request", "response"}, "")
        self.request = _Edit(args["request"], "request: ") if "request" in args else None
        self.response = _Edit(args["response"], "response: ") if "response" in args else None

    def __call__(self, message: Message) -> Result | None:
        edit = self.request if message.phase == "request_headers" else \
            self.response if message.phase == "response_headers" else None
        return Continue() if edit is None else edit.apply(message)


# -- json-redact ------------------------------------------------------------------------------

Path = tuple[str | int, ...]


def parse_path(text: object) -> Path:
    """``user.ssn``, ``items.*.card``, ``items.0.id``: keys separated by dots; ``*`` is every key
    of an object or every element of a list; a number is a list index (or a key of that name)."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"a path must be a non-empty string such as 'user.ssn', got {text!r}")
    parts: list[str | int] = []
    for part in text.split("."):
        if not part:
            raise ValueError(f"empty segment in path {text!r}")
        parts.append(int(part) if part.isdigit() else part)
    return tuple(parts)


def redact(document: Any, path: Path, mask: str | None) -> int:
    """Drop (``mask`` None) or mask the values at ``path`` in ``document``, in place; how many."""
    if not path:
        return 0
    head, rest = path[0], path[1:]
    if isinstance(document, dict):
        keys = list(document) if head == "*" else [str(head)] if str(head) in document else []
        if not rest:
            for k in keys:
                if mask is None:
                    del document[k]
                else:
                    document[k] = mask
            return len(keys)
        return sum(redact(document[k], rest, mask) for k in keys)
    if isinstance(document, list):
        if head == "*":
            indexes = list(range(len(document)))
        elif isinstance(head, int) and head < len(document):
            indexes = [head]
        else:
            return 0
        if not rest:
            if mask is None:
                for i in reversed(indexes):
                    del document[i]
            else:
                for i in indexes:
                    document[i] = mask
            return len(indexes)
        return sum(redact(document[i], rest, mask) for i in indexes)
    return 0


class JsonRedact(Processor):
    """``json-redact``: in JSON bodies (by ``content-type`` ``application/json`` or ``+json``, or
    any body that parses when the content type is missing), ``drop`` removes the fields at the
    given paths and ``mask`` replaces their values with ``mask_with`` (default ``"***"``). Other
    bodies pass unchanged. Needs ``body: buffered``."""

    needs_buffered_body: ClassVar[bool] = True

    def __init__(self, args: Mapping[str, Any]) -> None:
        super().__init__(args)
        _keys(args, {"drop", "mask", "mask_with"}, "")
        self.drop = self._paths(args.get("drop", []), "drop")
        self.mask = self._paths(args.get("mask", []), "mask")
        if not self.drop and not self.mask:
            raise ValueError("give at least one path in drop or mask")
        self.mask_with = args.get("mask_with", "***")
        if not isinstance(self.mask_with, str | int | float | bool) and self.mask_with is not None:
            raise ValueError("mask_with: must be a string, number, boolean or null")

    @staticmethod
    def _paths(value: object, name: str) -> list[Path]:
        if not isinstance(value, list):
            raise ValueError(f"{name}: must be a list of paths")
        try:
            return [parse_path(p) for p in value]
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None

    def __call__(self, message: Message) -> Result | None:
        if message.body is None or not _is_json(message.headers):
            return Continue()
        try:
            document = json.loads(message.body)
        except ValueError:
            return Continue()
        changed = sum(redact(document, p, None) for p in self.drop)
        changed += sum(redact(document, p, self.mask_with) for p in self.mask)  # type: ignore[arg-type]
        if not changed:
            return Continue()
        return ReplaceBody(json.dumps(document, separators=(",", ":")).encode())


def _is_json(headers: Mapping[str, str]) -> bool:
    kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return not kind or kind == "application/json" or kind.endswith("+json")


# -- json-schema ------------------------------------------------------------------------------


class JsonSchema(Processor):
    """``json-schema``: a request body that is not JSON, or does not validate against ``schema``
    (JSON Schema, draft 2020-12 unless the schema says ``$schema``), is answered 400 with the
    validation message as JSON ``{"error": ..., "path": ...}``. ``methods`` (default POST, PUT,
    PATCH) are checked; other requests pass. Needs ``body: buffered`` on ``request_body``."""

    needs_buffered_body: ClassVar[bool] = True

    def __init__(self, args: Mapping[str, Any]) -> None:
        super().__init__(args)
        _keys(args, {"schema", "methods"}, "")
        if "schema" not in args:
            raise ValueError("'schema' is required (a JSON Schema)")
        import jsonschema  # only meshes that use json-schema import it

        schema = args["schema"]
        if not isinstance(schema, Mapping | bool):
            raise ValueError("schema: must be a JSON Schema (a mapping)")
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"schema: not a valid JSON Schema: {exc.message}") from None
        self.validator = cls(schema)
        methods = args.get("methods", ["POST", "PUT", "PATCH"])
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise ValueError("methods: must be a list of HTTP methods")
        self.methods = {m.upper() for m in methods}

    def __call__(self, message: Message) -> Result | None:
        if message.phase != "request_body" or (message.method and message.method not in self.methods):
            return Continue()
        try:
            document = json.loads(message.body or b"")
        except ValueError as exc:
            return _bad_request(f"request body is not JSON: {exc}", "")
        import jsonschema

        error = jsonschema.exceptions.best_match(self.validator.iter_errors(document))
        if error is None:
            return Continue()
        return _bad_request(error.message, error.json_path)


def _bad_request(message: str, path: str) -> Respond:
    body = json.dumps({"error": message[:1000], "path": path}) + "\n"
    return Respond(400, body, {"content-type": "application/json"})


__all__: Sequence[str] = ["JsonRedact", "JsonSchema", "SetHeaders", "parse_path", "redact"]
