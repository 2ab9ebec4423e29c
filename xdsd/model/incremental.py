"""Successive revisions of one mesh text, each read only where it changed.

A mesh file is edited a line at a time, but reading it is YAML parsing and validation of every
service: ~0.6 s for 1,000 services. ``MeshReader`` keeps what each entry of the name-keyed sections
(``services``, ``gateways``, ``authorization``) gave last time and reads again only the entries
whose lines changed, and the rest of the file (``mesh``, ``telemetry``, ...), so an edit costs what
it changed plus the whole-mesh checks (``cross_check``).

The shortcut is only ever an optimization of ``load_mesh``: the mesh it returns is equal to what
``load_mesh`` would return for the same text, and any text it is not certain about -- an error
anywhere, an alias or anchor that crosses entries, tabs, any line break but ``\\n``, limits nearly
reached -- is read by ``load_mesh`` itself, whose errors are the ones reported. A section is cut
where YAML's block structure cuts it: an entry starts at a line indented exactly as the section's
first entry; a cut that lands inside a quoted scalar or a flow collection leaves a piece that does
not parse alone, and the whole text then goes to ``load_mesh``. A section that is not plainly a
block mapping (flow style, an anchor on it) is read with the rest of the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel

from xdsd.model.crosscheck import cross_check
from xdsd.model.load import MAX_DEPTH, MAX_NODES, MAX_TEXT_BYTES, _walk, load_mesh, read_fast
from xdsd.model.mesh import Gateway, Mesh, Policy, Service

# The name-keyed sections of a mesh, cut into entries, and each entry's model.
SECTIONS: dict[str, type[BaseModel]] = {"services": Service, "gateways": Gateway, "authorization": Policy}
# Line breaks other than "\n" that YAML 1.1 knows (CR, NEL, LS, PS), tabs, a BOM: the whole text is
# read by load_mesh.
_UNUSUAL = "\r\x85\u2028\u2029\t\ufeff"
_TOP_LEVEL = re.compile(r"\n[^ #\n]")  # a line that is neither indented, blank nor a comment
_CONTENT = re.compile(r"\n( *)([^ #\n])")  # a line with content, and its indentation
_ANCHOR = re.compile(r"&([^\s\[\]{},]+)")  # an anchor's name (YAML 1.1: up to a space or flow indicator)
# Room left below the limits (nodes, levels of nesting), so that no text near them is decided by
# the sum of its pieces: load_mesh reads it whole.
_NODES_ROOM = 64
_LEVELS_ROOM = 4


@dataclass(frozen=True, slots=True)
class _Read:
    name: str
    value: BaseModel
    nodes: int  # the piece's size in nodes, its own mapping included


class MeshReader:
    """``read(text)`` == ``load_mesh(text)``, reusing the entries of the last text read whose lines
    are unchanged. One reader per source of successive texts; not for concurrent use."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], _Read] = {}  # (section, an entry's lines) -> what they gave
        # Lines of an entry that did not read alone in the last text (an alias to another entry,
        # an error): while the text has them, it goes to load_mesh at once.
        self._alone: set[tuple[str, str]] = set()
        self.reused = 0  # entries taken from the last text by the last read (tests, benchmarks)

    def read(self, text: str) -> Mesh:
        """The text's mesh; MeshError as ``load_mesh`` raises it."""
        mesh = self._incremental(text)
        if mesh is not None:
            return mesh
        self.reused = 0
        return load_mesh(text)

    def _incremental(self, text: str) -> Mesh | None:
        if not isinstance(text, str) or len(text) > MAX_TEXT_BYTES:
            return None  # load_mesh says what is wrong with it
        pieces = _cut(text)
        if pieces is None:
            return None
        skeleton, cut, lines = pieces
        keyed = [(section, block) for section, blocks in cut.items() for block in blocks]
        if self._alone and not self._alone.isdisjoint(keyed):
            return None
        if "&" in text and _anchors_shared([skeleton, *(block for _, block in keyed)]):
            return None  # YAML refuses an anchor name used twice; pieces read alone would not see it
        head = read_fast(skeleton, block=True)
        if head is None or head[2] > MAX_DEPTH - _LEVELS_ROOM:
            return None
        data, nodes, _, keys = head
        # Each section's `key: {}` must be the skeleton's own key on the line it was put on (not
        # text inside a scalar that spans it, with the key spelled another way elsewhere).
        if not isinstance(data, dict) or any(data.get(section) != {} or keys.get(section) != lines[section]
                                             for section in cut) or _walk(data):
            return None
        known = self._known
        fresh: dict[tuple[str, str], _Read] = {}
        sections: dict[str, dict[str, BaseModel]] = {section: {} for section in cut}
        reused = 0
        for key in keyed:
            got = known.get(key) or fresh.get(key)
            if got is None:
                got = _read_block(key[1], SECTIONS[key[0]])
                if got is None:
                    self._alone = {key}
                    return None
            else:
                reused += 1
            entries = sections[key[0]]
            if got.name in entries:
                return None  # a duplicate key: load_mesh says where
            entries[got.name] = got.value
            fresh[key] = got
            nodes += got.nodes - 1
        if nodes > MAX_NODES - _NODES_ROOM:
            return None
        data.update(sections)
        try:
            mesh = Mesh.model_validate(data)
        except Exception:  # noqa: BLE001 - invalid, or a bug: load_mesh reports it
            return None
        for section, entries in sections.items():
            held = getattr(mesh, section)
            if any(held.get(name) is not value for name, value in entries.items()):
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


def _read_block(block: str, model: type[BaseModel]) -> _Read | None:
    """One entry's lines, read alone: a mapping of exactly one name to a valid ``model``."""
    read = read_fast(block, block=True, first_line=True)
    if read is None:
        return None
    data, nodes, levels, _ = read
    # In the whole text the block's mapping is the section's mapping, a level deeper.
    if levels > MAX_DEPTH - _LEVELS_ROOM or not isinstance(data, dict) or len(data) != 1:
        return None
    ((name, value),) = data.items()
    if not isinstance(name, str) or _walk(data):
        return None
    try:
        return _Read(name, model.model_validate(value), nodes)
    except Exception:  # noqa: BLE001 - invalid, or a bug: load_mesh reports it
        return None


def _anchors_shared(pieces: list[str]) -> bool:
    """Does an anchor name (anything that looks like one, quoted text included) appear in more
    than one piece?"""
    seen: set[str] = set()
    for piece in pieces:
        names = set(_ANCHOR.findall(piece))
        if not seen.isdisjoint(names):
            return True
        seen |= names
    return False


def _cut(text: str) -> tuple[str, dict[str, list[str]], dict[str, int]] | None:
    """(the text with ``<section>: {}`` for each section it cut, each cut section's entries' lines,
    the line of the skeleton each ``<section>: {}`` is on), or None when the text cannot be cut at
    all. (Each pattern begins with a newline: Python's re finds a literal first character quickly,
    a line start (``^``) slowly.)"""
    if any(c in text for c in _UNUSUAL) or text.startswith("%") or "\n%" in text:
        return None  # (a directive such as %TAG changes what the pieces after it mean)
    text = "\n" + text  # every line, the first included, follows a newline
    spans: list[tuple[int, int, str]] = []  # (where the key's line starts, where the section ends, section)
    cut: dict[str, list[str]] = {}
    for section in SECTIONS:
        found = _section(text, section)
        if found is None:
            continue
        start, end, blocks = found
        spans.append((start, end, section))
        cut[section] = blocks
    if not cut:
        return None
    parts = []
    lines: dict[str, int] = {}
    at = 1
    line = 0
    for start, end, section in sorted(spans):
        line += text.count("\n", at, start)
        lines[section] = line
        line += 1
        parts += [text[at:start], f"{section}: {{}}\n"]
        at = end
    parts.append(text[at:])
    return "".join(parts), cut, lines


def _section(text: str, section: str) -> tuple[int, int, list[str]] | None:
    """Where ``section``'s key line starts, where the section ends, and its entries' lines; None when
    it is not there once, as a block mapping of one or more entries on lines of their own."""
    key = re.compile(f"\\n{section}:(?:[ ]+#[^\\n]*)?[ ]*(?=\\n|$)")  # a comment needs a space before it
    found = key.search(text)
    if found is None or key.search(text, found.end()) is not None:
        return None
    nl = found.end()  # the newline that ends the key's line (or the end of the text)
    after = _TOP_LEVEL.search(text, nl)
    end = len(text) if after is None else after.start() + 1  # the first line after the section
    first = _CONTENT.search(text, nl, end)
    if first is None:
        return None  # no entries: the key alone is null, which load_mesh judges
    indent = len(first.group(1))
    if text[first.start(2)] in "-?{[&*!|>":
        return None
    if indent > 1 and re.compile(f"\\n {{1,{indent - 1}}}[^ #\\n]").search(text, nl, end):
        return None  # a line less indented than the entries
    starts = [m.start() + 1 for m in re.compile(f"\\n {{{indent}}}[^ #\\n]").finditer(text, nl, end)]
    # Each entry runs to the next one, the last to the section's end: trailing blank lines and
    # comment-like lines are kept (they may be the content of a block scalar).
    blocks = [text[a:b] for a, b in zip(starts, [*starts[1:], end], strict=True)]
    if not blocks[-1].endswith("\n"):
        blocks[-1] += "\n"
    return found.start() + 1, end, blocks

