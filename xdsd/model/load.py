"""YAML text -> validated Mesh, or a MeshError whose messages name each bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from xdsd.errors import FieldError, MeshError
from xdsd.model.crosscheck import cross_check
from xdsd.model.mesh import Mesh

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Far more nodes than any real mesh; an alias bomb ("billion laughs") expands past it.
_MAX_EXPANDED_NODES = 1_000_000


class _Checker:
    """One pass over the composed YAML graph, before anything is constructed:

    - two equal keys in one mapping are an error (PyYAML would keep the last one silently);
    - every mapping key is read as text: all keys in a mesh file are names, so ``123:`` or ``on:``
      is the name ``"123"`` / ``"on"``, not the int 123 or the bool True;
    - an alias that contains itself is an error, not a RecursionError;
    - a document whose aliases expand to more than ``_MAX_EXPANDED_NODES`` nodes is rejected.
    """

    def __init__(self) -> None:
        self.errors: list[FieldError] = []
        self._sizes: dict[int, int] = {}  # id(node) -> expanded size, for nodes already checked
        self._open: set[int] = set()  # nodes on the current path (a revisit is a cycle)

    def check(self, node: yaml.Node, path: str) -> int:
        """Check ``node`` (at ``path``) and return its expanded size in nodes."""
        key = id(node)
        if key in self._sizes:
            return self._sizes[key]
        if key in self._open:
            self.errors.append(FieldError(path, "recursive alias: the value contains itself"))
            return 0
        self._open.add(key)
        size = 1
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.tag != _MERGE_TAG:
                        key_node.tag = _STR_TAG
                    name = str(key_node.value)
                else:
                    name = "<complex key>"
                child = f"{path}.{name}" if path else name
                if key_node.tag != _MERGE_TAG:
                    if name in seen:
                        self.errors.append(FieldError(child, f"duplicate key (line {key_node.start_mark.line + 1})"))
                    seen.add(name)
                size += self.check(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                size += self.check(item, f"{path}[{i}]")
        self._open.discard(key)
        self._sizes[key] = size
        return size


def _load_yaml(text: str) -> Any:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise MeshError([FieldError("", f"not valid YAML: {exc}")]) from None
    if node is None:
        return {}
    checker = _Checker()
    size = checker.check(node, "")
    if checker.errors:
        raise MeshError(checker.errors)
    if size > _MAX_EXPANDED_NODES:
        raise MeshError([FieldError("", f"aliases expand to more than {_MAX_EXPANDED_NODES} nodes")])
    loader = yaml.SafeLoader("")
    try:
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise MeshError([FieldError("", f"not valid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    # A document that is only ``null`` / ``~`` is as empty as an empty file.
    return {} if data is None else data


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
            cur = cur[part] if isinstance(cur, list) and -len(cur) <= part < len(cur) else None
        else:
            out += f".{part}" if out else str(part)
            cur = None
    return out


def parse_mesh(data: Any) -> Mesh:
    """Validate already-parsed data (a dict) into a Mesh."""
    if not isinstance(data, dict):
        raise MeshError([FieldError("", f"the mesh config must be a mapping, got {type(data).__name__}")])
    try:
        mesh = Mesh.model_validate(data)
    except ValidationError as exc:
        raise MeshError([FieldError(_path(data, tuple(e["loc"])), _message(dict(e))) for e in exc.errors()]) from None
    errors = cross_check(mesh)
    if errors:
        raise MeshError(errors)
    return mesh


def load_mesh(text: str) -> Mesh:
    return parse_mesh(_load_yaml(text))


def load_mesh_file(path: str | Path) -> Mesh:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise MeshError([FieldError("", f"cannot read {path}: {exc.strerror or exc}")]) from None
    return load_mesh(text)
