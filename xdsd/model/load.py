"""YAML text -> validated Mesh, or a MeshError whose messages name each bad field.

Whatever the input, ``load_mesh``, ``load_mesh_file`` and ``parse_mesh`` return a Mesh or raise
MeshError; nothing else escapes. The limits that make that true (README, security section):

- ``MAX_TEXT_BYTES``: a mesh file (or text) is at most 32 MiB;
- ``MAX_DEPTH``: lists and mappings nest at most 64 levels deep, counted while the YAML is
  composed (PyYAML's composer recurses once per level, so a deeper document is refused before it
  can exhaust the interpreter's stack) and again after aliases are expanded;
- ``MAX_NODES``: at most 1,000,000 values once aliases are expanded ("billion laughs");
- only plain YAML: strings, numbers, booleans, null, lists and mappings (no ``!!binary``,
  ``!!set``, ``!!python/...`` or custom tags; a date-like scalar such as ``2024-01-01`` is read as
  text, since no mesh field is a date);
- every string is at most ``fields.MAX_STRING`` characters of UTF-8 text without control
  characters (``fields.text_problem``); every integer fits in 64 bits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from xdsd.errors import FieldError, MeshError
from xdsd.model.crosscheck import cross_check
from xdsd.model.fields import safe_repr, text_problem
from xdsd.model.mesh import Mesh

MAX_TEXT_BYTES = 32 * 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 1_000_000

_YAML = "tag:yaml.org,2002:"
_STR_TAG = _YAML + "str"
_MERGE_TAG = _YAML + "merge"
_SEQ_TAG = _YAML + "seq"
_MAP_TAG = _YAML + "map"
_TIMESTAMP_TAG = _YAML + "timestamp"
# Scalars that construct to str, int, float, bool or None.
_SCALAR_TAGS = {_STR_TAG, _YAML + "null", _YAML + "bool", _YAML + "int", _YAML + "float"}
_INT_RANGE = "number out of range: integers in a mesh config fit in 64 bits"
_TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels of lists and mappings"
# The message of an exception that only a bug in validation can raise (tests look for it).
INTERNAL_ERROR = "xdsd could not validate this mesh (a bug in xdsd)"

_Part = str | int
_HAVE_LIBYAML = bool(getattr(yaml, "__with_libyaml__", False))


def _segment(name: str) -> str:
    """A mapping key as a path segment: itself, or its repr if it cannot be printed as it is."""
    return name if len(name) <= 100 and name.isprintable() else safe_repr(name)


def _join(path: str, part: _Part) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else part


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_YAML):] if tag.startswith(_YAML) else tag


class _TooDeep(Exception):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader whose composer refuses to nest deeper than ``MAX_DEPTH``: the
    composer recurses once per level (a few frames each), so 3,000 ``[`` would raise a
    RecursionError somewhere in it. The parser and scanner below it do not recurse."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._parts: list[_Part | None] = []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        # index: None for the document or a mapping key, an int in a list, the key node of a value.
        if isinstance(index, int):
            part: _Part | None = index
        elif isinstance(index, yaml.ScalarNode):
            part = _segment(str(index.value))
        elif index is not None:
            part = "<complex key>"
        else:
            part = None if parent is None else "<key>"
        self._parts.append(part)
        try:
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._parts.pop()

    def _enter(self) -> None:
        if self._depth >= MAX_DEPTH:
            path = ""
            for part in self._parts:
                if part is not None:
                    path = _join(path, part)
            raise _TooDeep(path)
        self._depth += 1

    def compose_sequence_node(self, anchor: str | None) -> yaml.Node:
        self._enter()
        try:
            return super().compose_sequence_node(anchor)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor: str | None) -> yaml.Node:
        self._enter()
        try:
            return super().compose_mapping_node(anchor)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1


class _Checker:
    """One pass over the composed YAML graph, before anything is constructed:

    - two equal keys in one mapping are an error (PyYAML would keep the last one silently);
    - every mapping key is read as text: all keys in a mesh file are names, so ``123:`` or ``on:``
      is the name ``"123"`` / ``"on"``, not the int 123 or the bool True; a list or mapping as a key
      is an error;
    - only plain tags: a scalar is a string, number, boolean or null (a timestamp is read as the
      text it is), a collection a list or mapping; a scalar that cannot be read as its tag says
      (``!!int abc``, ``2024-13-45``, an integer of thousands of digits) is an error;
    - an alias that contains itself is an error, not a RecursionError;
    - a document whose aliases expand to more than ``MAX_NODES`` nodes, or nest deeper than
      ``MAX_DEPTH`` levels, is rejected.
    """

    def __init__(self, constructor: yaml.constructor.SafeConstructor) -> None:
        self.errors: list[FieldError] = []
        self._constructor = constructor
        self._known: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, levels below)
        self._open: set[int] = set()  # nodes on the current path (a revisit is a cycle)
        self._too_deep = False

    def _deep(self, path: str) -> None:
        if not self._too_deep:
            self._too_deep = True
            self.errors.append(FieldError(path, _TOO_DEEP))

    def check(self, node: yaml.Node, path: str, depth: int = 0) -> int:
        """Check ``node`` (at ``path``, inside ``depth`` lists and mappings) and return its
        expanded size in nodes."""
        key = id(node)
        known = self._known.get(key)
        if known is not None:
            if depth + known[1] > MAX_DEPTH:
                self._deep(path)
            return known[0]
        if key in self._open:
            self.errors.append(FieldError(path, "recursive alias: the value contains itself"))
            return 0
        if isinstance(node, yaml.ScalarNode):
            self._scalar(node, path)
            self._known[key] = (1, 0)
            return 1
        if depth >= MAX_DEPTH:
            self._deep(path)
            return 1
        self._open.add(key)
        size, levels = 1, 0
        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAP_TAG:
                self._tag(node, path)
            seen: set[str] = set()
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.tag != _MERGE_TAG:
                        key_node.tag = _STR_TAG
                    name = str(key_node.value)
                    child = _join(path, _segment(name))
                else:
                    child = _join(path, "<complex key>")
                    self.errors.append(FieldError(child, "a mapping key must be a name, not a list or mapping"))
                    continue
                if key_node.tag != _MERGE_TAG:
                    if name in seen:
                        self.errors.append(FieldError(child, f"duplicate key (line {key_node.start_mark.line + 1})"))
                    seen.add(name)
                size += self.check(value_node, child, depth + 1)
                levels = max(levels, self._known.get(id(value_node), (0, 0))[1])
        elif isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                self._tag(node, path)
            for i, item in enumerate(node.value):
                size += self.check(item, _join(path, i), depth + 1)
                levels = max(levels, self._known.get(id(item), (0, 0))[1])
        self._open.discard(key)
        self._known[key] = (size, levels + 1)
        return size

    def levels(self, node: yaml.Node) -> int:
        """How many levels of lists and mappings a checked node nests (a scalar: 0)."""
        return self._known.get(id(node), (0, 0))[1]

    def _tag(self, node: yaml.Node, path: str) -> None:
        self.errors.append(FieldError(
            path, f"unsupported YAML tag {safe_repr(_short_tag(node.tag))}: a mesh config holds only strings, "
                  "numbers, booleans, null, lists and mappings"))

    def _scalar(self, node: yaml.ScalarNode, path: str) -> None:
        if node.tag == _TIMESTAMP_TAG:
            node.tag = _STR_TAG  # no mesh field is a date: `2024-01-01` is that text
        if node.tag not in _SCALAR_TAGS:
            self._tag(node, path)
            return
        if node.tag == _STR_TAG:
            return
        construct = self._constructor.yaml_constructors[node.tag]
        try:
            construct(self._constructor, node)
        except Exception:  # noqa: BLE001 - int('abc'), bool_values['xyz'], int of 5,000 digits, ...
            value = str(node.value)
            if node.tag == _YAML + "int" and len(value) > 32:
                self.errors.append(FieldError(path, _INT_RANGE))
            else:
                self.errors.append(FieldError(path, f"not a valid {_short_tag(node.tag)[2:]}: {safe_repr(value)}"))


_SLOW = object()  # what _load_fast returns when the document needs the careful path


def _load_fast(text: str) -> Any:
    """The document through libyaml's C parser and composer, checked and constructed by the same
    ``_Checker`` and constructor as the careful path; ``_SLOW`` on any problem at all, so that a
    document with an error is read again by ``_Loader`` and reported exactly as it would be.

    The C composer recurses per level like PyYAML's, but libyaml refuses more than 1,000 levels of
    nesting in its scanner, so it cannot exhaust the stack. Valid documents are read about six
    times faster than by the pure-Python loader."""
    read = read_fast(text)
    return _SLOW if read is None else read[0]


def read_fast(text: str, block: bool = False, first_line: bool = False) -> tuple[Any, int, int, dict[str, int]] | None:
    """``_load_fast`` for a document that must be a mapping: (its data, its size in nodes once
    aliases are expanded, how many levels of lists and mappings it nests, the line of each of its
    keys), or None on any problem at all (the caller reads it the careful way). ``block``: the
    mapping must be in block style, each key a plain or quoted name (no merge key) at the mapping's
    column; ``first_line``: and begin on the text's first line."""
    if not _HAVE_LIBYAML or "\ufeff" in text[1:]:  # libyaml and PyYAML read a stray BOM differently
        return None
    try:
        loader = yaml.CSafeLoader(text)
    except Exception:  # noqa: BLE001 - any doubt: the careful path decides
        return None
    try:
        node = loader.get_single_node()
        if not isinstance(node, yaml.MappingNode):  # a mesh is a mapping: anything else, the careful path
            return None
        if block and not _block_keys(node, first_line):
            return None
        checker = _Checker(loader)
        size = checker.check(node, "")
        if size > MAX_NODES or checker.errors:
            return None
        lines = {str(key.value): key.start_mark.line for key, _ in node.value if isinstance(key, yaml.ScalarNode)}
        return loader.construct_document(node), size, checker.levels(node), lines
    except Exception:  # noqa: BLE001
        return None
    finally:
        loader.dispose()


def _block_keys(node: yaml.MappingNode, first_line: bool) -> bool:
    if node.flow_style or not node.value or (first_line and node.start_mark.line != 0):
        return False
    column = node.start_mark.column
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.value == "<<" or key.tag == _MERGE_TAG:
            return False
        if key.start_mark.column != column:
            return False
    return True


def _load_yaml(text: str) -> Any:
    if len(text) > MAX_TEXT_BYTES:
        raise MeshError([FieldError("", f"the mesh config is larger than {MAX_TEXT_BYTES // (1024 * 1024)} MiB")])
    data = _load_fast(text)
    if data is not _SLOW:
        return data
    try:
        loader = _Loader(text)  # its reader refuses characters YAML does not allow (NUL, lone surrogates)
    except yaml.YAMLError as exc:
        raise MeshError([FieldError("", f"not valid YAML: {exc}")]) from None
    try:
        try:
            node = loader.get_single_node()
        except _TooDeep as exc:
            raise MeshError([FieldError(exc.path, _TOO_DEEP)]) from None
        except yaml.YAMLError as exc:
            raise MeshError([FieldError("", f"not valid YAML: {exc}")]) from None
        except Exception as exc:  # noqa: BLE001 - the contract: only MeshError leaves this module
            raise MeshError([FieldError("", f"{INTERNAL_ERROR} reading the YAML: {type(exc).__name__}: {exc}")]) from None
        if node is None:
            return {}
        checker = _Checker(loader)
        size = checker.check(node, "")
        if checker.errors:
            raise MeshError(checker.errors)
        if size > MAX_NODES:
            raise MeshError([FieldError("", f"aliases expand to more than {MAX_NODES} nodes")])
        try:
            data = loader.construct_document(node)
        except yaml.YAMLError as exc:
            raise MeshError([FieldError("", f"not valid YAML: {exc}")]) from None
        except Exception as exc:  # noqa: BLE001
            raise MeshError([FieldError("", f"{INTERNAL_ERROR} reading the YAML: {type(exc).__name__}: {exc}")]) from None
    finally:
        loader.dispose()
    # A document that is only ``null`` / ``~`` is as empty as an empty file.
    return {} if data is None else data


def _walk(data: Any) -> list[FieldError]:
    """Rules for every value, before the model sees any: nesting depth, number of values,
    strings (``fields.text_problem``, keys included), integers of at most 64 bits, and only
    plain data (str, int, float, bool, None, list, tuple, dict). Iterative: no recursion."""
    errors: list[FieldError] = []
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    count = 0
    too_deep = False
    while stack:
        value, path, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            errors.append(FieldError("", f"more than {MAX_NODES} values"))
            break
        if isinstance(value, dict | list | tuple):
            if depth >= MAX_DEPTH:
                if not too_deep:
                    errors.append(FieldError(path, _TOO_DEEP))
                    too_deep = True
                continue
            children: list[tuple[Any, str, int]] = []
            if isinstance(value, dict):
                for k, v in value.items():
                    if isinstance(k, str):
                        child = _join(path, _segment(k))
                        problem = text_problem(k)
                        if problem is not None:
                            errors.append(FieldError(child, f"key {problem}"))
                            continue
                    elif isinstance(k, int) and not isinstance(k, bool) and k.bit_length() > 64:
                        errors.append(FieldError(_join(path, "<key>"), f"key {_INT_RANGE}"))
                        continue
                    elif isinstance(k, int | float | bool) or k is None:
                        child = _join(path, str(k))  # the model says what is wrong with it
                    else:
                        errors.append(FieldError(_join(path, "<key>"), f"a mapping key must be a name, got {type(k).__name__}"))
                        continue
                    children.append((v, child, depth + 1))
            else:
                children = [(v, _join(path, i), depth + 1) for i, v in enumerate(value)]
            stack.extend(reversed(children))  # popped in document order
        elif isinstance(value, str):
            problem = text_problem(value)
            if problem is not None:
                errors.append(FieldError(path, problem))
        elif isinstance(value, int) and not isinstance(value, bool):
            if value.bit_length() > 64:
                errors.append(FieldError(path, _INT_RANGE))
        elif not (value is None or isinstance(value, bool | float)):
            errors.append(FieldError(path, f"must be a string, number, boolean, null, list or mapping, "
                                           f"got {type(value).__name__}"))
    return errors


def _message(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", ""))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    return msg


def _path(data: Any, loc: tuple[Any, ...]) -> str:
    """Like ``format_loc``, but it follows the data so that a mapping key that is not a string
    (``{123: ...}``) reads ``services.123``, not ``services[123]`` like a list index."""
    out = ""
    cur: Any = data
    for part in loc:
        if part == "[key]":
            continue
        if isinstance(cur, dict):
            out += f".{part}" if out else str(part)
            cur = cur.get(part)
        elif isinstance(part, int):
            out += f"[{part}]"
            cur = cur[part] if isinstance(cur, list | tuple) and -len(cur) <= part < len(cur) else None
        else:
            out += f".{part}" if out else str(part)
            cur = None
    return out


def parse_mesh(data: Any) -> Mesh:
    """Validate already-parsed data (a dict) into a Mesh."""
    if not isinstance(data, dict):
        raise MeshError([FieldError("", f"the mesh config must be a mapping, got {type(data).__name__}")])
    errors = _walk(data)
    if errors:
        raise MeshError(errors)
    try:
        mesh = Mesh.model_validate(data)
    except ValidationError as exc:
        raise MeshError([FieldError(_path(data, tuple(e["loc"])), _message(dict(e))) for e in exc.errors()]) from None
    except Exception as exc:  # noqa: BLE001 - the contract: only MeshError leaves this module
        raise MeshError([FieldError("", f"{INTERNAL_ERROR}: {type(exc).__name__}: {exc}")]) from None
    try:
        errors = cross_check(mesh)
    except Exception as exc:  # noqa: BLE001
        raise MeshError([FieldError("", f"{INTERNAL_ERROR}: {type(exc).__name__}: {exc}")]) from None
    if errors:
        raise MeshError(errors)
    return mesh


def load_mesh(text: str) -> Mesh:
    if not isinstance(text, str):
        raise MeshError([FieldError("", f"the mesh config must be text, got {type(text).__name__}")])
    return parse_mesh(_load_yaml(text))


def load_mesh_file(path: str | Path) -> Mesh:
    """The mesh in file ``path``: at most ``MAX_TEXT_BYTES`` of UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TEXT_BYTES + 1)
    except OSError as exc:
        raise MeshError([FieldError("", f"cannot read {path}: {exc.strerror or exc}")]) from None
    except ValueError as exc:  # a path with a NUL byte
        raise MeshError([FieldError("", f"cannot read {path!r}: {exc}")]) from None
    if len(raw) > MAX_TEXT_BYTES:
        raise MeshError([FieldError("", f"{path} is larger than {MAX_TEXT_BYTES // (1024 * 1024)} MiB")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MeshError([FieldError("", f"{path} is not UTF-8: {exc}")]) from None
    return load_mesh(text)
