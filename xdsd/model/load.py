"""YAML text -> validated Mesh, or a MeshError whose messages name each bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from xdsd.errors import FieldError, MeshError, format_loc
from xdsd.model.crosscheck import cross_check
from xdsd.model.mesh import Mesh


def _duplicate_keys(node: yaml.Node, path: str, errors: list[FieldError]) -> None:
    """PyYAML keeps the last of two equal keys silently; a mesh file with two ``reviews:`` is a mistake."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            if key in seen:
                errors.append(FieldError(child, f"duplicate key (line {key_node.start_mark.line + 1})"))
            seen.add(key)
            _duplicate_keys(value_node, child, errors)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, f"{path}[{i}]", errors)


def _load_yaml(text: str) -> Any:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise MeshError([FieldError("", f"not valid YAML: {exc}")]) from None
    if node is None:
        return {}
    errors: list[FieldError] = []
    _duplicate_keys(node, "", errors)
    if errors:
        raise MeshError(errors)
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise MeshError([FieldError("", f"not valid YAML: {exc}")]) from None
    finally:
        loader.dispose()


def _message(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", ""))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    return msg


def parse_mesh(data: Any) -> Mesh:
    """Validate already-parsed data (a dict) into a Mesh."""
    if not isinstance(data, dict):
        raise MeshError([FieldError("", f"the mesh config must be a mapping, got {type(data).__name__}")])
    try:
        mesh = Mesh.model_validate(data)
    except ValidationError as exc:
        raise MeshError([FieldError(format_loc(tuple(e["loc"])), _message(dict(e))) for e in exc.errors()]) from None
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
