"""The path an authorization rule is matched against: the path the app will serve (pure, no I/O).

Envoy normalizes a request's path before ext_authz sees it and forwards that same path to the app
(the listeners set ``normalize_path``, ``merge_slashes`` and ``UNESCAPE_AND_FORWARD`` for ``%2F`` /
``%5C``). What it leaves alone is what servlet containers (Tomcat, Jetty, Undertow, and Spring on
them) still do: they remove each segment's path parameters, so ``/admin;jsessionid=1`` is served as
``/admin``; and a ``..;`` that Envoy did not read as ``..`` (it does for a literal ``..;x``, not for
``%2e%2e;``) is ``..`` to them: ``/x/%2e%2e;/admin`` reaches the app as ``/x/..;/admin``, served as
``/admin``. xdsd must also be right when nothing normalized the path first, so ``authz_path`` does
the whole job itself and is idempotent.

``authz_path`` is the servlet reading. ``literal_path`` is the same reading for an app that knows no
path parameters (``;`` is an ordinary character there, so ``/admin/..;/x`` stays under ``/admin/``);
the policy asks both when they differ (``readings``), and a request must be allowed under each.
"""

from __future__ import annotations

import re

# An absolute-form request target (RFC 9112 §3.2.2): only its path names the resource.
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/]*")
# %2F and %5C are separators: Envoy unescapes them (UNESCAPE_AND_FORWARD) and reads "\" as "/".
_SEPARATOR = re.compile(r"%(?:2[fF]|5[cC])")
# An escape, or a "%" that starts none.
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}|%")
# Escaped ASCII characters that keep their escape: decoded, each would change how the path is read
# ("%" would start a new escape, ";" path parameters, "?" a query, "#" a fragment).
_KEEP_ESCAPED = frozenset(b"%;?#")


def _escape_table() -> dict[str, str]:
    """Every escape, in any case of its hex digits, to its normal form (step 4 of ``authz_path``)."""
    table = {"%": "%25"}
    for byte in range(256):
        normal = chr(byte) if byte < 0x80 and byte not in _KEEP_ESCAPED else f"%{byte:02X}"
        for hi in {f"{byte >> 4:X}", f"{byte >> 4:x}"}:
            for lo in {f"{byte & 15:X}", f"{byte & 15:x}"}:
                table[f"%{hi}{lo}"] = normal
    return table


_ESCAPES = _escape_table()


def authz_path(path: str, case_insensitive: bool = False) -> str:
    """The path a servlet container serves for the request path ``path`` (query included or not).

    In order:
    1. ``*`` (the target of ``OPTIONS *``, RFC 9112 §3.2.4) is ``*``; the query and fragment are
       removed (from the first ``?`` or ``#``), and an absolute-form target keeps only its path.
    2. ``\\``, ``%2F`` and ``%5C`` are separators, like ``/``.
    3. Each segment loses its path parameters, from its first ``;`` (Servlet 6.0 §3.5; Tomcat,
       Jetty and Spring do this before decoding, so ``%3B`` never starts parameters).
    4. Escapes are decoded when they stand for an ASCII character other than ``%``, ``;``, ``?``,
       ``#`` (so ``%61dmin`` is ``admin``, ``%2e%2e`` is ``..``, ``%21`` is ``!``); the four kept,
       and bytes outside ASCII, stay escaped with upper-case hex (RFC 3986 §6.2.2.1-2); characters
       outside ASCII are UTF-8 escaped, and a ``%`` that starts no escape is ``%25``.
    5. Empty segments are dropped (``//`` is ``/``), then ``.`` and ``..`` segments are resolved,
       never above the root (RFC 3986 §5.2.4, in the servlet order: parameters, decoding, merging,
       resolving). A path ending in ``/``, ``/.`` or ``/..`` keeps its trailing ``/``.
    6. With ``case_insensitive``, ASCII letters are lower-cased.

    The result is ``*`` or starts with ``/``, has no ``;``, no ``//``, no ``.`` or ``..`` segment,
    and is its own ``authz_path``. It is only ever compared with rules: the request goes on as sent.
    """
    if _clean(path):
        return path.lower() if case_insensitive else path
    return _normalize(path, case_insensitive, params=True)


def literal_path(path: str, case_insensitive: bool = False) -> str:
    """``authz_path`` for an app that knows no path parameters: the same steps without step 3
    (``;`` is an ordinary character, so ``..;`` is a name, not ``..``)."""
    return _normalize(path, case_insensitive, params=False)


def readings(path: str, case_insensitive: bool = False) -> tuple[str, ...]:
    """The distinct ways apps read ``path``: ``authz_path``, then ``literal_path`` if it differs
    (only a path with a ``;`` can be read two ways)."""
    servlet = _normalize(path, case_insensitive, params=True)
    if ";" not in path:
        return (servlet,)
    literal = _normalize(path, case_insensitive, params=False)
    return (servlet,) if literal == servlet else (servlet, literal)


def rule_path_problem(rule_path: str) -> str | None:
    """Why a rule's path (``/exact``, ``/prefix*``) would not match as it is written, or None.
    Spellings of one path (``%61``/``a``, escapes' case) are fine: rule paths are read with
    ``authz_path`` too."""
    star = "*" if rule_path.endswith("*") else ""
    path = rule_path[:-1] if star else rule_path
    odd = sorted({c for c in path if c in ";?#\\"})
    if odd:
        return (f"{' '.join(repr(c) for c in odd)} cannot appear in a rule path: requests are matched "
                "without their path parameters, query and fragment, and with '\\' read as '/'")
    normal = _normalize(path, False, params=True)
    spelled = "/".join(_canonical(s) for s in _SEPARATOR.sub("/", path).split("/"))
    if normal != spelled:
        return f"{rule_path!r} is read as {normal + star!r} (empty, '.' and '..' segments resolved): write that"
    return None


def _clean(path: str) -> bool:
    """Already in normal form, the common case: starts with "/", ASCII only, and none of "%"
    (escapes), ";" (path parameters), "\\", "?" / "#" (query, fragment), "//", "/." (perhaps a dot
    segment). A few ``in`` tests cost less than one regular expression search."""
    return (path[:1] == "/" and path.isascii() and "%" not in path and ";" not in path and "\\" not in path
            and "?" not in path and "#" not in path and "//" not in path and "/." not in path)


def _normalize(path: str, case_insensitive: bool, params: bool) -> str:
    if _clean(path):
        return path.lower() if case_insensitive else path
    end = len(path)
    for stop in "?#":
        i = path.find(stop, 0, end)
        if i >= 0:
            end = i
    target = path[:end]
    if target == "*":
        return "*"
    target = target.replace("\\", "/")
    if "%" in target:
        target = _SEPARATOR.sub("/", target)
    if target[:1] != "/" and (absolute := _ABSOLUTE.match(target)) is not None:
        target = target[absolute.end():]
    plain = "%" not in target and target.isascii()  # no escapes to put in normal form
    out: list[str] = []
    trailing = False  # the path ends in "/" (or in a "." / ".." segment, which stands for one)
    for segment in target.split("/"):
        if params and ";" in segment:
            segment = segment[:segment.index(";")]
        if not plain:
            segment = _canonical(segment)
        if segment in ("", ".", ".."):
            if segment == ".." and out:
                out.pop()
            trailing = True
            continue
        out.append(segment)
        trailing = False
    result = "/" + "/".join(out) + ("/" if trailing and out else "")
    return result.lower() if case_insensitive else result


def _canonical(segment: str) -> str:
    """One segment's escapes and characters in normal form (step 4 of ``authz_path``). Decoded
    characters are ASCII, so escaping what is not ASCII afterwards cannot touch them."""
    if "%" in segment:
        segment = _ESCAPE.sub(_escape, segment)
    if segment.isascii():
        return segment
    # Not ASCII: UTF-8 escaped; a byte that arrived undecodable (a surrogate escape) is that byte.
    return "".join(c if c.isascii() else "".join(f"%{b:02X}" for b in _utf8(c)) for c in segment)


def _escape(match: re.Match[str]) -> str:
    return _ESCAPES[match.group()]


def _utf8(char: str) -> bytes:
    try:
        return char.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that was no undecodable byte
        return char.encode("utf-8", "surrogatepass")
