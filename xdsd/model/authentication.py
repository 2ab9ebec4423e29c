"""The ``authentication:`` section of the mesh config: end-user identity from JWTs, and OIDC login.

    authentication:
      issuers:
        corp:
          issuer: https://login.example.com
          jwks_uri: https://login.example.com/.well-known/jwks.json   # or jwks: <inline JSON>
          audiences: [shop]
          forward_claims: {sub: x-user, email: x-user-email}
      require:                                  # who must present a token, where
        edge: {issuers: [corp], paths: ["/api/*"]}   # a gateway or a service with a sidecar

A login (OIDC authorization code flow at a gateway) is a gateway route's ``login``; its client
secret is read from ``client_secret_file`` when the mesh is loaded and leaves xdsd only over SDS.
Field rules live here; rules that span sections (known issuers, gateways, sidecars) in
``check_authentication``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, PrivateAttr, StrictStr, model_validator

from xdsd.errors import FieldError
from xdsd.model.base import FrozenModel as _Model
from xdsd.model.fields import Name, PathPrefix, PositiveDuration, Text, check_host, safe_repr
from xdsd.model.traffic import HeaderName

if TYPE_CHECKING:
    from xdsd.model.mesh import Mesh

# A client secret file is read whole; anything larger is not a client secret.
MAX_SECRET_BYTES = 64 * 1024
# Key types Envoy's jwt_authn verifies with a public key (RFC 7518 §6; OKP for EdDSA). A symmetric
# key (``oct``) is refused: inline keys are part of the listener, which every node of the gateway or
# service holds and config dumps, diffs, history and CSDS show, so its ``k`` would let anyone mint tokens.
_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})
# Private key members (RFC 7518 §6.2.2, §6.3.2; RFC 8037 §2): a key set holds public keys only.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_CLAIM_RE = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")


def check_url(value: str) -> str:
    """An absolute http(s) URL with a host (an issuer's endpoints, its JWKS)."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{safe_repr(value)} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{safe_repr(value)} is not an http:// or https:// URL with a host")
    try:
        check_host(parts.hostname)
    except ValueError:
        raise ValueError(f"{safe_repr(value)}: {safe_repr(parts.hostname)} is not a host name or IP address") from None
    if port == 0:
        raise ValueError(f"{safe_repr(value)}: port must be 1..65535")
    if any(c in value for c in " \"<>\\^`{|}") or parts.fragment:
        raise ValueError(f"{safe_repr(value)} is not a URL (spaces, quotes or a #fragment)")
    return value


def jwks_problem(value: object) -> str | None:
    """Why ``value`` (JSON text or an already parsed mapping) is not a JSON Web Key Set Envoy can
    use, or None (RFC 7517 §5: an object with a non-empty ``keys`` list of keys with a ``kty``)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as exc:
            return f"not JSON: {exc}"
    if not isinstance(value, dict):
        return f"must be a JSON Web Key Set (an object with 'keys'), got {type(value).__name__}"
    keys = value.get("keys")
    if not isinstance(keys, list) or not keys:
        return "a JSON Web Key Set needs a non-empty list 'keys'"
    for i, key in enumerate(keys):
        if not isinstance(key, dict):
            return f"keys[{i}] must be an object, got {type(key).__name__}"
        kty = key.get("kty")
        named = f"keys[{i}]" + (f" (kid {safe_repr(key['kid'])})" if isinstance(key.get("kid"), str) else "")
        if kty == "oct":
            return (f"{named} is a symmetric key (kty 'oct'): anyone who can read the mesh's config could sign "
                    "tokens with it; give the issuer's public keys (RSA, EC or OKP)")
        if kty not in _KEY_TYPES:
            return f"keys[{i}].kty must be one of {', '.join(sorted(_KEY_TYPES))}, got {kty!r}"
        private = [m for m in _PRIVATE_MEMBERS if m in key]
        if private:
            return (f"{named} holds private key material ({', '.join(repr(m) for m in private)}): give the "
                    "public key only")
        needed = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}[kty]
        for member in needed:
            if not isinstance(key.get(member), str) or not key[member]:
                return f"keys[{i}] ({kty}) needs the member {member!r}"
    return None


def _jwks_text(value: object) -> str:
    """Inline keys as JSON text (a YAML mapping is accepted and serialized canonically)."""
    if isinstance(value, dict):
        try:
            value = json.dumps(value, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a JSON Web Key Set: {exc}") from None
    if not isinstance(value, str):
        raise ValueError(f"must be a JSON Web Key Set (JSON text or a mapping), got {type(value).__name__}")
    problem = jwks_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _check_claim(value: str) -> str:
    if not _CLAIM_RE.fullmatch(value):
        raise ValueError(f"{safe_repr(value)} is not a claim name (letters, digits and _ . : / -)")
    return value


# Headers a claim may not be forwarded in: the client's copy of a forwarded header is removed
# before the token is read, and these carry the token itself, the caller's mesh identity, the node
# token, the route, or the framing of the request.
_RESERVED_HEADERS = frozenset({
    "authorization", "cookie", "host", "x-forwarded-client-cert", "x-forwarded-for", "x-forwarded-proto",
    "x-forwarded-host", "x-request-id", "traceparent", "tracestate", "content-length", "content-type",
    "transfer-encoding", "connection", "te", "upgrade", "keep-alive", "proxy-connection",
})


def _check_forward_claims(value: dict[str, str]) -> dict[str, str]:
    seen: dict[str, str] = {}
    for claim, header in value.items():
        if header in _RESERVED_HEADERS or header.startswith(("x-envoy-", "x-xdsd-")):
            raise ValueError(f"claim {claim!r}: {header!r} cannot carry a claim (Envoy or xdsd rely on it, or the "
                             "client's copy is needed)")
        if header in seen:
            raise ValueError(f"claims {seen[header]!r} and {claim!r} are both forwarded in {header!r}")
        seen[header] = claim
    return value


def _check_audiences(value: list[str]) -> list[str]:
    if not value:
        raise ValueError("give at least one audience, or leave audiences out to accept any")
    return value


def _check_secret_file(value: str) -> str:
    _read_secret(value)
    return value


# Files and directories a client secret is never read from: xdsd's own keys and passwords (its
# state directory, its TLS, CA and etcd key and password files). The secret goes over SDS to the
# gateway and from there to the issuer's token endpoint, which the mesh file names: without this, a
# mesh author could have xdsd send any file it can read to a server of their choice. Set by the
# process that knows them (``xdsd serve``, the commands with a ``--state-dir``) before it loads a mesh.
_protected: tuple[Path, ...] = ()


def protect_secret_files(paths: Iterable[str | Path | None]) -> None:
    """Refuse ``client_secret_file`` inside any of ``paths`` (directories) or naming one (files)."""
    global _protected
    _protected = tuple(Path(p) for p in paths if p is not None and str(p))


def _protected_problem(path: str) -> str | None:
    try:
        real = Path(path).resolve()
        st = os.stat(path)
    except (OSError, ValueError, RuntimeError):
        return None  # not readable: reading it says why
    for p in _protected:
        try:
            other = p.resolve()
            pst = os.stat(p)
        except (OSError, ValueError, RuntimeError):
            continue
        if real == other or real.is_relative_to(other) or (pst.st_dev, pst.st_ino) == (st.st_dev, st.st_ino):
            return (f"{safe_repr(path)} is one of xdsd's own key, password or state files ({p}); the secret is sent "
                    "to the issuer's token endpoint: give a file holding only the client secret")
    if st.st_nlink > 1:  # a hard link makes a file look like another one: never a client secret's
        return f"{safe_repr(path)} has other hard links; give a client secret file of its own"
    return None


def _read_secret(path: str) -> str:
    """The client secret in ``path``: one line of printable text, not a PEM block, not one of xdsd's
    own files (what is read goes over SDS and then to the issuer's token endpoint). Errors never
    quote the file's content."""
    if (problem := _protected_problem(path)) is not None:
        raise ValueError(problem)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SECRET_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {safe_repr(path)}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(raw) > MAX_SECRET_BYTES:
        raise ValueError(f"{safe_repr(path)} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{safe_repr(path)} is not UTF-8 text") from None
    if not text:
        raise ValueError(f"{safe_repr(path)} is empty")
    if "-----BEGIN" in text or "PRIVATE KEY" in text:
        raise ValueError(f"{safe_repr(path)} holds a PEM block (a key or a certificate), not a client secret")
    if "\n" in text or "\r" in text:
        raise ValueError(f"{safe_repr(path)} holds several lines; a client secret is one line")
    if not text.isprintable():
        raise ValueError(f"{safe_repr(path)} holds control characters; a client secret is one line of printable text")
    return text


def _claim_text(value: object) -> object:
    """A claim value in a rule: text, or a number or boolean written as its JSON text (claims are
    compared as text, ``authz.policy.claim_values``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return value


Url = Annotated[StrictStr, AfterValidator(check_url)]
ClaimValue = Annotated[Text, BeforeValidator(_claim_text)]
ClaimName = Annotated[StrictStr, AfterValidator(_check_claim)]
InlineJwks = Annotated[str, BeforeValidator(_jwks_text)]
Audiences = Annotated[list[Text], AfterValidator(_check_audiences)]


class Issuer(_Model):
    """An identity provider whose JWTs the mesh accepts."""

    issuer: Text  # the ``iss`` claim, exactly
    jwks_uri: Url | None = None
    jwks: InlineJwks | None = None
    audiences: Audiences | None = None  # None: any audience
    # claim -> request header that carries its value to the app (a client's copy is removed)
    forward_claims: Annotated[dict[ClaimName, HeaderName], AfterValidator(_check_forward_claims)] = Field(
        default_factory=dict)
    # How long Envoy keeps the keys fetched from jwks_uri; a rotated key is picked up after it.
    jwks_cache_duration: PositiveDuration = 300.0
    # PEM trust anchors on the Envoy's machine that verify the https endpoints (None: the system's).
    ca_file: Text | None = None
    # OIDC endpoints, needed by a gateway route's ``login`` only.
    authorization_endpoint: Url | None = None
    token_endpoint: Url | None = None
    end_session_endpoint: Url | None = None


class Requirement(_Model):
    """Who must present a token from one of ``issuers`` on which paths (exact paths, prefixes
    ending in ``*``, or ``*``); other paths accept a request without one (a valid token sent there
    still identifies the end user)."""

    issuers: list[Name]
    paths: list[Text] = Field(default_factory=lambda: ["*"])


class Authentication(_Model):
    issuers: dict[Name, Issuer] = Field(default_factory=dict)
    # gateway or service name -> requirement
    require: dict[Name, Requirement] = Field(default_factory=dict)


class Login(_Model):
    """OIDC login (authorization code flow) in front of a gateway route: Envoy's ``oauth2`` filter."""

    issuer: Name
    client_id: Text
    client_secret_file: Annotated[StrictStr, AfterValidator(_check_secret_file)]
    redirect_path: PathPrefix = "/oauth2/callback"
    signout_path: PathPrefix = "/oauth2/signout"
    scopes: list[Text] = Field(default_factory=lambda: ["openid"])
    _client_secret: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _load_secret(self) -> Login:
        self._client_secret = _read_secret(self.client_secret_file)
        return self

    @property
    def client_secret(self) -> str:
        """The client secret as read when the mesh was loaded (only ever served over SDS)."""
        return self._client_secret

    def __repr_args__(self) -> Any:  # never print the secret
        return [(k, v) for k, v in super().__repr_args__() if k != "_client_secret"]


_PARAMS = "(?:;[^/]*)?"  # a segment's ;parameters, which servlet containers drop


def path_regex(path: str) -> str:
    """A requirement path (exact, ``prefix*`` or ``*``) as the RE2 regex Envoy matches the whole
    request path with; it also matches when a segment carries ``;parameters`` (``/api;x/orders`` is
    ``/api/orders`` to servlet containers, so it must need a token as well). An exact path matches
    with or without a trailing ``/``."""
    if path == "*":
        return "/.*"
    prefix = path.endswith("*")
    body = path[:-1] if prefix else path
    segments = body.split("/")[1:]  # body starts with "/"
    out = "".join("/" + re.escape(s) + (_PARAMS if s else "") for s in segments)
    return out + ".*" if prefix else out + "/?" if body != "/" else out


def requirement_path_problem(path: str) -> str | None:
    from xdsd.authz.paths import rule_path_problem

    if path == "*":
        return None
    if not path.startswith("/") or "*" in path[:-1]:
        return f"{path!r}: use an exact path, a prefix ending in '*', or '*'"
    return rule_path_problem(path)


def check_authentication(mesh: Mesh) -> list[FieldError]:
    """Cross-section rules: a requirement names known issuers and a gateway or a sidecar service;
    an issuer has exactly one key source; a login names an issuer with OIDC endpoints."""
    auth = mesh.authentication
    errors: list[FieldError] = []
    trusted: dict[tuple[str | None, int | None], tuple[str, str | None]] = {}  # https host -> issuer, ca_file
    for name, issuer in auth.issuers.items():
        path = f"authentication.issuers.{name}"
        if (issuer.jwks_uri is None) == (issuer.jwks is None):
            errors.append(FieldError(path, "give exactly one of jwks_uri (fetched by Envoy) or jwks (inline keys)"))
        for url in (issuer.jwks_uri, issuer.token_endpoint):
            if url is None or not url.startswith("https://"):
                continue
            parts = urlsplit(url)
            host = (parts.hostname, parts.port or 443)
            other, ca_file = trusted.setdefault(host, (name, issuer.ca_file))
            if ca_file != issuer.ca_file:  # one cluster per host: one set of trust anchors
                errors.append(FieldError(f"{path}.ca_file", f"issuer {other!r} reaches {parts.hostname} with "
                                                            f"ca_file {ca_file!r}: give both the same"))
                break
    for name, req in auth.require.items():
        path = f"authentication.require.{name}"
        service = mesh.services.get(name)
        if name not in mesh.gateways and service is None:
            errors.append(FieldError(path, f"unknown gateway or service {name!r}"))
        elif name not in mesh.gateways and service is not None and service.sidecar is None:
            errors.append(FieldError(path, f"service {name!r} has no sidecar: nothing could check its requests' tokens"))
        if not req.issuers:
            errors.append(FieldError(f"{path}.issuers", "give at least one issuer"))
        for i, issuer_name in enumerate(req.issuers):
            if issuer_name not in auth.issuers:
                errors.append(FieldError(f"{path}.issuers[{i}]", _unknown_issuer(mesh, issuer_name)))
        if not req.paths:
            errors.append(FieldError(f"{path}.paths", "give at least one path (or '*' for every path)"))
        for i, p in enumerate(req.paths):
            if (problem := requirement_path_problem(p)) is not None:
                errors.append(FieldError(f"{path}.paths[{i}]", problem))
    for gname, gateway in mesh.gateways.items():
        for i, route in enumerate(gateway.routes):
            login = route.login
            if login is None:
                continue
            path = f"gateways.{gname}.routes[{i}].login"
            if route.prefix is None:
                errors.append(FieldError(path, "a login protects a route prefix: give the route a prefix"))
            issuer = auth.issuers.get(login.issuer)
            if issuer is None:
                errors.append(FieldError(f"{path}.issuer", _unknown_issuer(mesh, login.issuer)))
                continue
            for endpoint in ("authorization_endpoint", "token_endpoint"):
                if getattr(issuer, endpoint) is None:
                    errors.append(FieldError(f"{path}.issuer",
                                             f"issuer {login.issuer!r} has no {endpoint} (needed for a login)"))
            if login.redirect_path == login.signout_path:
                errors.append(FieldError(f"{path}.signout_path", "must differ from redirect_path"))
        if sum(r.login is not None for r in gateway.routes) > 1:
            errors.append(FieldError(f"gateways.{gname}.routes", "at most one route of a gateway has a login"))
    for name, policy in mesh.authorization.items():
        for i, rule in enumerate(policy.rules):
            for kind, match in (("allow", rule.allow), ("deny", rule.deny)):
                if match is None or not match.uses_request_auth():
                    continue
                path = f"authorization.{name}.rules[{i}].{kind}"
                if name not in auth.require:
                    field = "claims" if match.claims else "request_principals"
                    errors.append(FieldError(f"{path}.{field}", f"{name!r} verifies no tokens: add authentication.require.{name}"))
                for j, principal in enumerate(match.request_principals):
                    if "/" not in principal.rstrip("/"):
                        errors.append(FieldError(f"{path}.request_principals[{j}]",
                                                 f"{safe_repr(principal)}: write <iss>/<sub>"))
    return errors


def _unknown_issuer(mesh: Mesh, name: str) -> str:
    known = ", ".join(sorted(mesh.authentication.issuers)) or "none"
    return f"unknown issuer {name!r} (known: {known})"
