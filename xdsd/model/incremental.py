"""Successive revisions of one mesh text, each read only where it changed.

A mesh file is edited a line at a time, but reading it is YAML parsing and validation of every
service: ~0.7 s for 1,000 services. ``MeshReader`` keeps what each service's lines gave last time
and reads again only the services whose lines changed (and the rest of the file, which holds no
services), so an edit costs what it changed plus the whole-mesh checks (``cross_check``).

The shortcut is only ever an optimization of ``load_mesh``: the mesh it returns is equal to what
``load_mesh`` would return for the same text, and any text it is not certain about -- an error
anywhere, an alias or anchor that crosses services, flow style around the services, tabs, any line
break but ``\\n``, limits nearly reached -- is read by ``load_mesh`` itself, whose errors are the
ones reported. The service blocks are cut where YAML's block structure cuts them: an entry of the
``services:`` mapping starts at a line indented exactly as the first entry; a cut that lands inside
a quoted scalar or a flow collection leaves a piece that does not parse alone, and the whole text
then goes to ``load_mesh``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from xdsd.model.crosscheck import cross_check
from xdsd.model.load import MAX_DEPTH, MAX_NODES, _walk, load_mesh, read_fast
from xdsd.model.mesh import Mesh, Service

_SERVICES_KEY = re.compile(r"\nservices:[ ]*(?:#[^\n]*)?(?=\n|$)")  # the key alone on its line
_TOP_LEVEL = re.compile(r"\n[^ #\n]")  # a line that is neither indented, blank nor a comment
_CONTENT = re.compile(r"\n( *)([^ #\n])")  # a line with content, and its indentation
# Line breaks other than "\n" that YAML 1.1 knows (CR, NEL, LS, PS), tabs, a BOM: the whole text is
# read by load_mesh.
_UNUSUAL = "\r\x85\u2028\u2029\t\ufeff"
# Room left below the limits (nodes, levels of nesting), so that no text near them is decided by
# the sum of its pieces: load_mesh reads it whole.
_NODES_ROOM = 64
_LEVELS_ROOM = 4


@dataclass(frozen=True, slots=True)
class _Read:
    name: str
    service: Service
    nodes: int  # the piece's size in nodes, its own mapping included


class MeshReader:
    """``read(text)`` == ``load_mesh(text)``, reusing the services of the last text read whose lines
    are unchanged. One reader per source of successive texts; not for concurrent use."""

    def __init__(self) -> None:
        self._known: dict[str, _Read] = {}  # a service's lines -> what they gave
        # Lines of a service that did not read alone in the last text (an alias to another
        # service, an error): while the text has them, it goes to load_mesh at once.
        self._alone: set[str] = set()
        self.reused = 0  # services taken from the last text by the last read (tests, benchmarks)

    def read(self, text: str) -> Mesh:
        """The text's mesh; MeshError as ``load_mesh`` raises it."""
        mesh = self._incremental(text)
        if mesh is not None:
            return mesh
        self.reused = 0
        return load_mesh(text)

    def _incremental(self, text: str) -> Mesh | None:
        pieces = _cut(text)
        if pieces is None:
            return None
        skeleton, blocks = pieces
        if self._alone and not self._alone.isdisjoint(blocks):
            return None
        head = read_fast(skeleton)
        if head is None or head[2] > MAX_DEPTH - _LEVELS_ROOM:
            return None
        data, nodes, _ = head
        if not isinstance(data, dict) or data.get("services") != {} or _walk(data):
            return None
        known = self._known
        fresh: dict[str, _Read] = {}
        services: dict[str, Service] = {}
        reused = 0
        for block in blocks:
            got = known.get(block) or fresh.get(block)
            if got is None:
                got = _read_block(block)
                if got is None:
                    self._alone = {block}
                    return None
            else:
                reused += 1
            if got.name in services:
                return None  # a duplicate key: load_mesh says where
            services[got.name] = got.service
            fresh[block] = got
            nodes += got.nodes - 1
        if nodes > MAX_NODES - _NODES_ROOM:
            return None
        data["services"] = services
        try:
            mesh = Mesh.model_validate(data)
        except Exception:  # noqa: BLE001 - invalid, or a bug: load_mesh reports it
            return None
        if any(mesh.services[name] is not service for name, service in services.items()):
            return None  # the model copied what it was given: not the mesh load_mesh would build
        try:
            if cross_check(mesh):
                return None
        except Exception:  # noqa: BLE001 - load_mesh reports it
            return None
        self._known = fresh
        self._alone = set()
        self.reused = reused
        return mesh


def _read_block(block: str) -> _Read | None:
    """One service's lines, read alone: a mapping of exactly one name to a valid Service."""
    read = read_fast(block)
    if read is None:
        return None
    data, nodes, levels = read
    # In the whole text the block's mapping is the ``services`` mapping, a level deeper.
    if levels > MAX_DEPTH - _LEVELS_ROOM or not isinstance(data, dict) or len(data) != 1:
        return None
    ((name, value),) = data.items()
    if not isinstance(name, str) or _walk(data):
        return None
    try:
        service = Service.model_validate(value)
    except Exception:  # noqa: BLE001 - invalid, or a bug: load_mesh reports it
        return None
    return _Read(name, service, nodes)


def _cut(text: str) -> tuple[str, list[str]] | None:
    """(the text with ``services: {}`` for its services block, each service's lines), or None when
    the text is not plainly a block mapping with a block ``services:`` mapping of one or more entries.
    (Each pattern begins with a newline: Python's re finds a literal first character quickly, a
    line start (``^``) slowly.)"""
    if any(c in text for c in _UNUSUAL):
        return None
    text = "\n" + text  # every line, the first included, follows a newline
    keys = _SERVICES_KEY.findall(text)
    if len(keys) != 1:
        return None  # none, or two (load_mesh says so)
    found = _SERVICES_KEY.search(text)
    assert found is not None
    nl = found.end()  # the newline that ends the `services:` line (or the end of the text)
    after = _TOP_LEVEL.search(text, nl)
    end = len(text) if after is None else after.start() + 1  # the first line after the block
    first = _CONTENT.search(text, nl, end)
    if first is None:
        return None  # no entries: `services:` alone is null, which load_mesh judges
    indent = len(first.group(1))
    if text[first.start(2)] in "-?{[&*!|>":
        return None
    if indent > 1 and re.compile(f"\n {{1,{indent - 1}}}[^ #\n]").search(text, nl, end):
        return None  # a line less indented than the entries
    starts = [m.start() + 1 for m in re.compile(f"\n {{{indent}}}[^ #\n]").finditer(text, nl, end)]
    # Comments and blank lines after the last entry belong to no service: keep them out of it, so
    # that a block's text is the same wherever it stands.
    tail = text[starts[-1]:end].split("\n")
    while len(tail) > 1 and (not tail[-1].strip(" ") or tail[-1].lstrip(" ").startswith("#")):
        tail.pop()
    blocks = [text[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    blocks.append("\n".join(tail) + "\n")
    skeleton = text[1:found.start() + 1] + "services: {}\n" + text[end:]
    return skeleton, blocks
