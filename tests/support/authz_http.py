"""The HTTP/1.1 ext_authz port, spoken by hand: a mesh with a policy, the check requests Envoy's
``http_service`` sends, and a reader for the answers (tests/unit/test_authz_http*.py)."""

from __future__ import annotations

import asyncio

MESH = """
mesh: {trust_domain: td}
services:
  reviews: {}
  productpage: {}
gateways:
  edge: {listen: {address: 0.0.0.0, port: 8080}, routes: [{prefix: /, service: reviews}]}
authorization:
  reviews:
    default: deny
    rules:
      - {name: pp-read, allow: {from: [productpage], methods: [GET, HEAD], paths: ["/reviews/*"]}}
      - {name: no-admin, deny: {paths: [/admin]}}
      - {name: tenant, allow: {headers: {X-Tenant: a}}}
      - {name: probe, dry_run: true, deny: {paths: [/reviews/probe]}}
  edge:
    rules:
      - {name: open, allow: {paths: ["/*"]}}
"""

PP = "By=spiffe://td/service/reviews;Hash=abc;URI=spiffe://td/service/productpage"


def check(path: str, method: str = "GET", xfcc: str | None = PP, extra: str = "") -> bytes:
    service, _, rest = path.partition("/")
    head = f"{method} /_xdsd/authz/{service}//{rest} HTTP/1.1\r\nhost: xdsd-authz\r\ncontent-length: 0\r\n"
    if xfcc is not None:
        head += f"x-forwarded-client-cert: {xfcc}\r\n"
    return (head + extra + "\r\n").encode()


async def read_response(reader: asyncio.StreamReader, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = b"" if head_only else await reader.readexactly(int(headers["content-length"]))
    return status, headers, body
