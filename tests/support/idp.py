"""A small identity provider on loopback for tests: signs JWTs (RS256, ES256) with ``cryptography``,
serves its key set (``/jwks``, rotatable), and the OIDC authorization code flow (``/authorize``
redirects back with a code, ``/token`` exchanges it for tokens when the client secret is right).

    with IdentityProvider() as idp:
        token = idp.token(sub="alice", aud="shop")            # RS256 with the current key
        idp.rotate()                                          # new RSA key; the old one leaves the set
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlencode, urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(n: int, size: int | None = None) -> str:
    return b64url(n.to_bytes(size or (n.bit_length() + 7) // 8, "big"))


class SigningKey:
    """One key: RS256 (RSA 2048) or ES256 (P-256), with its ``kid`` and public JWK."""

    def __init__(self, alg: str = "RS256", kid: str | None = None) -> None:
        self.alg = alg
        self.kid = kid or secrets.token_hex(4)
        if alg == "RS256":
            self._key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES256":
            self._key = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(alg)

    def jwk(self) -> dict[str, str]:
        pub = self._key.public_key().public_numbers()
        if self.alg == "RS256":
            return {"kty": "RSA", "kid": self.kid, "alg": "RS256", "use": "sig", "n": _int(pub.n), "e": _int(pub.e)}
        return {"kty": "EC", "kid": self.kid, "alg": "ES256", "use": "sig", "crv": "P-256",
                "x": _int(pub.x, 32), "y": _int(pub.y, 32)}

    def sign(self, claims: dict[str, Any]) -> str:
        header = {"alg": self.alg, "typ": "JWT", "kid": self.kid}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}".encode()
        if self.alg == "RS256":
            sig = self._key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        else:
            r, s = decode_dss_signature(self._key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input.decode()}.{b64url(sig)}"


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [k.jwk() for k in keys]}


class IdentityProvider:
    """The provider's HTTP server runs in a thread on ``127.0.0.1`` (a free port)."""

    def __init__(self, client_id: str = "shop-web", client_secret: str = "s3cret", host: str = "127.0.0.1",
                 tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: (certificate, key) to serve https with."""
        self.client_id = client_id
        self.client_secret = client_secret
        self.key = SigningKey("RS256")
        self.jwks_fetches = 0
        self.token_requests: list[dict[str, list[str]]] = []
        self._codes: dict[str, str] = {}  # code -> sub
        self.login_as = "alice"
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                url = urlsplit(self.path)
                if url.path == "/jwks":
                    idp.jwks_fetches += 1
                    self._send(200, json.dumps(jwks(idp.key)).encode(), {"content-type": "application/json"})
                elif url.path == "/authorize":
                    q = {k: v[0] for k, v in parse_qs(url.query).items()}
                    if q.get("client_id") != idp.client_id or q.get("response_type") != "code":
                        self._send(400, b"bad authorization request")
                        return
                    code = secrets.token_urlsafe(12)
                    idp._codes[code] = idp.login_as
                    target = q["redirect_uri"] + "?" + urlencode({"code": code, "state": q.get("state", "")})
                    self._send(302, b"", {"location": target})
                else:
                    self._send(404)

            def do_POST(self) -> None:  # noqa: N802
                if urlsplit(self.path).path != "/token":
                    self._send(404)
                    return
                form = parse_qs(self.rfile.read(int(self.headers.get("content-length", "0"))).decode())
                idp.token_requests.append(form)
                client_id, secret = form.get("client_id", [""])[0], form.get("client_secret", [""])[0]
                auth = self.headers.get("authorization", "")
                if auth.startswith("Basic "):
                    client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
                    client_id, secret = unquote_plus(client_id), unquote_plus(secret)
                sub = idp._codes.pop(form.get("code", [""])[0], None)
                if client_id != idp.client_id or secret != idp.client_secret or sub is None:
                    self._send(400, b'{"error": "invalid_grant"}', {"content-type": "application/json"})
                    return
                access = idp.token(sub=sub, aud="shop")
                body = {"access_token": access, "id_token": access, "token_type": "Bearer", "expires_in": 600}
                self._send(200, json.dumps(body).encode(), {"content-type": "application/json"})

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
            scheme = "https"
        self.base = f"{scheme}://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="idp", daemon=True)

    @property
    def issuer(self) -> str:
        return self.base

    def start(self) -> IdentityProvider:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> IdentityProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rotate(self) -> SigningKey:
        """A new signing key; the key set serves only it from now on."""
        old, self.key = self.key, SigningKey("RS256")
        return old

    def claims(self, sub: str = "alice", aud: str = "shop", lifetime: float = 600, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        return {"iss": self.issuer, "sub": sub, "aud": aud, "iat": now, "exp": now + int(lifetime), **extra}

    def token(self, key: SigningKey | None = None, **claims: Any) -> str:
        return (key or self.key).sign(self.claims(**claims))
