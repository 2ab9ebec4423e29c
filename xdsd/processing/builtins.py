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
    bodies pass unchanged. Needs ``body: buffered``.

    It fails closed: a body that may be JSON but cannot be read (a ``content-encoding`` other than
    ``identity``, such as gzip; JSON by its content type that does not parse, or nests too deeply)
    is never passed on unredacted: the client is answered 502 (a response) or 400 (a request).
    So it needs the headers phase of each body phase it is given (``response_headers`` with
    ``response_body``): without them a compressed body would look like a body that is not JSON."""

    needs_buffered_body: ClassVar[bool] = True
    needs_body_headers: ClassVar[bool] = True

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
        encoding = _content_encoding(message.headers)
        if encoding:
            return _unreadable(message, f"a body with content-encoding {encoding[:100]!r} cannot be redacted")
        try:
            document = json.loads(message.body)
            changed = sum(redact(document, p, None) for p in self.drop)
            changed += sum(redact(document, p, self.mask_with) for p in self.mask)  # type: ignore[arg-type]
            if not changed:
                return Continue()
            return ReplaceBody(json.dumps(document, separators=(",", ":")).encode())
        except RecursionError:
            return _unreadable(message, "the JSON body nests too deeply to be redacted")
        except ValueError:
            if not _declared_json(message.headers):
                return Continue()  # no content type, and not JSON: nothing to redact
            return _unreadable(message, "the body is not valid JSON and cannot be redacted")


def _declared_json(headers: Mapping[str, str]) -> bool:
    kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


def _is_json(headers: Mapping[str, str]) -> bool:
    return "content-type" not in headers or not headers["content-type"].strip() or _declared_json(headers)


def _content_encoding(headers: Mapping[str, str]) -> str:
    """The body's content codings other than ``identity`` ("" when it is as sent)."""
    codings = [c.strip().lower() for c in headers.get("content-encoding", "").split(",")]
    return ", ".join(c for c in codings if c and c != "identity")


def _unreadable(message: Message, why: str) -> Respond:
    """A body json-redact cannot read is refused, never passed on unredacted."""
    status = 502 if message.phase.startswith("response") else 400
    return Respond(status, f"xdsd: json-redact: {why}\n", {"content-type": "text/plain"})


# -- json-schema ------------------------------------------------------------------------------

# Schema keywords whose values are data, not schemas (a "pattern" key in them is not a pattern).
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
# ECMA-262's \uXXXX escape, which RE2 writes \x{XXXX} (after an even number of backslashes).
_U_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u([0-9A-Fa-f]{4})")


class Patterns:
    """The schema's regular expressions, compiled with RE2 (linear time, whatever the pattern and
    the text; Python's ``re`` backtracks, and holds the GIL while it does: one request body could
    stall xdsd's event loop for minutes). A pattern RE2 cannot take (backreferences, lookaround)
    is refused when the mesh is validated."""

    def __init__(self) -> None:
        self._compiled: dict[str, Any] = {}

    def compile(self, pattern: str) -> Any:
        compiled = self._compiled.get(pattern)
        if compiled is None:
            import re2  # google-re2; only meshes that use json-schema import it

            options = re2.Options()
            options.log_errors = False
            options.never_capture = True
            try:
                compiled = re2.compile(_U_ESCAPE.sub(r"\1\\x{\2}", pattern), options)
            except re2.error as exc:
                reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
                raise ValueError(f"not supported by xdsd's linear-time regex engine (RE2): {reason}") from None
            if len(self._compiled) < 4096:  # the schema's own are compiled up front; this bounds the others
                self._compiled[pattern] = compiled
        return compiled

    def search(self, pattern: str, text: str) -> bool:
        return self.compile(pattern).search(text) is not None


def _schema_patterns(node: object, where: str) -> list[tuple[str, str]]:
    """Every ``pattern`` and ``patternProperties`` regex of a schema, with where it is."""
    found: list[tuple[str, str]] = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key in _DATA_KEYWORDS:
                continue
            at = f"{where}.{key}" if where else str(key)
            if key == "pattern" and isinstance(value, str):
                found.append((value, at))
            elif key == "patternProperties" and isinstance(value, Mapping):
                found += [(str(k), f"{at}[{k!r}]") for k in value]
            found += _schema_patterns(value, at)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _schema_patterns(item, f"{where}[{i}]")
    return found


def _has_key(node: object, name: str) -> bool:
    if isinstance(node, Mapping):
        return any(k == name or (k not in _DATA_KEYWORDS and _has_key(v, name)) for k, v in node.items())
    return isinstance(node, list) and any(_has_key(item, name) for item in node)


def _re2_validator(cls: Any, patterns: Patterns) -> Any:
    """``cls`` with every keyword that matches a regular expression doing it with RE2."""
    import jsonschema
    from jsonschema.exceptions import ValidationError

    def pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Any:
        if validator.is_type(instance, "string") and not patterns.search(patrn, instance):
            yield ValidationError(f"{instance[:200]!r} does not match {patrn!r}")

    def pattern_properties(validator: Any, pattern_properties: Any, instance: Any, schema: Any) -> Any:
        if not validator.is_type(instance, "object"):
            return
        for patrn, subschema in pattern_properties.items():
            for k, v in instance.items():
                if patterns.search(patrn, k):
                    yield from validator.descend(v, subschema, path=k, schema_path=patrn)

    def additional_properties(validator: Any, ap: Any, instance: Any, schema: Any) -> Any:
        if not validator.is_type(instance, "object"):
            return
        properties = schema.get("properties", {})
        regexes = list(schema.get("patternProperties", {}))
        extras = [k for k in instance if k not in properties and not any(patterns.search(r, k) for r in regexes)]
        if validator.is_type(ap, "object"):
            for extra in extras:
                yield from validator.descend(instance[extra], ap, path=extra)
        elif not ap and extras:
            shown = ", ".join(repr(e) for e in sorted(extras)[:20])
            if regexes:
                yield ValidationError(f"{shown} do(es) not match any of the regexes: "
                                      f"{', '.join(repr(r) for r in sorted(regexes))}")
            else:
                yield ValidationError(f"Additional properties are not allowed ({shown} unexpected)")

    return jsonschema.validators.extend(cls, {"pattern": pattern, "patternProperties": pattern_properties,
                                              "additionalProperties": additional_properties})


class JsonSchema(Processor):
    """``json-schema``: a request body that is not JSON, or does not validate against ``schema``
    (JSON Schema, draft 2020-12 unless the schema says ``$schema``), is answered 400 with the
    validation message as JSON ``{"error": ..., "path": ...}``. ``methods`` (default POST, PUT,
    PATCH) are checked; other requests pass. Needs ``body: buffered`` on ``request_body``.

    ``pattern`` and ``patternProperties`` are matched with RE2 (linear time): a pattern it cannot
    take is refused with the schema; a body that nests too deeply to validate is answered 400."""

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
        self.patterns = Patterns()
        for regex, where in _schema_patterns(schema, ""):
            try:
                self.patterns.compile(regex)
            except ValueError as exc:
                raise ValueError(f"schema: {where}: {regex!r} is {exc}") from None
        if _has_key(schema, "unevaluatedProperties") and _has_key(schema, "patternProperties"):
            # jsonschema matches patternProperties with Python's re when it evaluates unevaluatedProperties
            raise ValueError("schema: unevaluatedProperties together with patternProperties is not supported "
                             "(use additionalProperties)")
        self.validator = _re2_validator(cls, self.patterns)(schema)
        methods = args.get("methods", ["POST", "PUT", "PATCH"])
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise ValueError("methods: must be a list of HTTP methods")
        self.methods = {m.upper() for m in methods}

    def __call__(self, message: Message) -> Result | None:
        if message.phase != "request_body" or (message.method and message.method not in self.methods):
            return Continue()
        try:
            document = json.loads(message.body or b"")
        except RecursionError:
            return _bad_request("request body nests too deeply", "")
        except ValueError as exc:
            return _bad_request(f"request body is not JSON: {exc}", "")
        import jsonschema

        try:
            error = jsonschema.exceptions.best_match(self.validator.iter_errors(document))
        except RecursionError:
            return _bad_request("request body nests too deeply to be validated", "")
        if error is None:
            return Continue()
        return _bad_request(error.message, error.json_path)


def _bad_request(message: str, path: str) -> Respond:
    body = json.dumps({"error": message[:1000], "path": path}) + "\n"
    return Respond(400, body, {"content-type": "application/json"})


__all__: Sequence[str] = ["JsonRedact", "JsonSchema", "SetHeaders", "parse_path", "redact"]
