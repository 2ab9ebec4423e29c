"""``--store`` and the etcd options: parsed once, shared by ``xdsd serve`` and the commands that
read the state directory (bootstrap, token, register, status, ...)."""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PREFIX = "/xdsd"
ETCD_SCHEME = "etcd://"


class StoreSpecError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """``kind`` is ``file`` (the state directory) or ``etcd`` (``endpoints`` under ``prefix``)."""

    kind: str = "file"
    endpoints: tuple[tuple[str, int], ...] = ()
    prefix: str = DEFAULT_PREFIX
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password_file: Path | None = None

    @property
    def etcd(self) -> bool:
        return self.kind == "etcd"

    def describe(self) -> str:
        if not self.etcd:
            return "file"
        return ETCD_SCHEME + ",".join(_show(h, p) for h, p in self.endpoints) + f" (prefix {self.prefix})"

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        return self.password_file.read_text().rstrip("\r\n")


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoints(text: str) -> tuple[tuple[str, int], ...]:
    """``etcd://HOST:PORT[,HOST:PORT...]`` -> ((host, port), ...); StoreSpecError naming the part."""
    if not text.startswith(ETCD_SCHEME):
        raise StoreSpecError(f"--store: expected 'file' or etcd://HOST:PORT[,HOST:PORT...], got {text!r}")
    out = []
    for part in text[len(ETCD_SCHEME):].split(","):
        host, sep, port = part.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise StoreSpecError(f"--store: expected HOST:PORT, got {part!r} in {text!r}")
        out.append((host, int(port)))
    return tuple(out)


def parse_prefix(text: str) -> str:
    if not text.startswith("/") or text.endswith("/") and text != "/" or "\n" in text or len(text) > 200:
        raise StoreSpecError(f"--etcd-prefix: expected an absolute key prefix such as /xdsd, got {text!r}")
    return text.rstrip("/")


def add_store_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("store (shared state)")
    g.add_argument("--store", default="file", metavar="file|etcd://HOST:PORT[,...]",
                   help="where the mesh, registrations, CA and token keys live: the state directory (default) "
                        "or an etcd cluster shared by several xdsd replicas")
    g.add_argument("--etcd-prefix", default=DEFAULT_PREFIX, metavar="PREFIX",
                   help=f"key prefix in etcd (default {DEFAULT_PREFIX}); several meshes can share one etcd")
    g.add_argument("--etcd-cacert", type=Path, metavar="PEM", help="CA bundle that verifies etcd's certificate (TLS)")
    g.add_argument("--etcd-cert", type=Path, metavar="PEM", help="client certificate for etcd (mutual TLS)")
    g.add_argument("--etcd-key", type=Path, metavar="PEM", help="private key of --etcd-cert")
    g.add_argument("--etcd-user", metavar="NAME", help="etcd user (with --etcd-password-file)")
    g.add_argument("--etcd-password-file", type=Path, metavar="FILE", help="file holding the etcd user's password")
    g.add_argument("--etcd-plaintext", action="store_true",
                   help="talk to etcd members that are not on loopback without TLS (the CA and token keys and the "
                        "etcd password then travel in clear); without it such a --store needs --etcd-cacert")


def store_from_args(args: argparse.Namespace) -> StoreSpec:
    """The parsed options; StoreSpecError on a bad combination."""
    text = getattr(args, "store", "file") or "file"
    if text == "file":
        return StoreSpec()
    endpoints = parse_endpoints(text)
    prefix = parse_prefix(getattr(args, "etcd_prefix", DEFAULT_PREFIX) or DEFAULT_PREFIX)
    cert, key = getattr(args, "etcd_cert", None), getattr(args, "etcd_key", None)
    if (cert is None) != (key is None):
        raise StoreSpecError("--etcd-cert and --etcd-key go together")
    user, password_file = getattr(args, "etcd_user", None), getattr(args, "etcd_password_file", None)
    if (user is None) != (password_file is None):
        raise StoreSpecError("--etcd-user and --etcd-password-file go together")
    cacert = getattr(args, "etcd_cacert", None)
    if cert is not None and cacert is None:
        raise StoreSpecError("--etcd-cert needs --etcd-cacert (a client certificate is sent only over TLS)")
    for flag, path in (("--etcd-cacert", cacert), ("--etcd-cert", cert), ("--etcd-key", key),
                       ("--etcd-password-file", password_file)):
        if path is not None and not Path(path).is_file():
            raise StoreSpecError(f"{flag}: {path} is not a readable file")
    remote = [_show(h, p) for h, p in endpoints if not is_loopback_host(h)]
    if cacert is None and remote and not getattr(args, "etcd_plaintext", False):
        raise StoreSpecError(f"--store: {', '.join(remote)} is not on loopback: give --etcd-cacert (TLS), or "
                             "--etcd-plaintext to send the mesh's CA and token keys and the etcd password in clear")
    return StoreSpec("etcd", endpoints, prefix, cacert, cert, key, user, password_file)


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address: the only etcd members reached without TLS by default."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def grpc_target(endpoints: tuple[tuple[str, int], ...]) -> str:
    """One gRPC target that balances over every member: ``ipv4:a:p,b:p`` for addresses; a single
    host name goes through DNS (every address it has)."""
    try:
        ips = [ipaddress.ip_address(h) for h, _ in endpoints]
    except ValueError:
        if len(endpoints) == 1:
            return f"dns:///{_show(*endpoints[0])}"
        raise StoreSpecError("--store: give etcd members as IP addresses, or one DNS name with several addresses") from None
    scheme = "ipv4" if all(ip.version == 4 for ip in ips) else "ipv6"
    if scheme == "ipv6" and any(ip.version == 4 for ip in ips):
        raise StoreSpecError("--store: mix of IPv4 and IPv6 members; use one family")
    return scheme + ":" + ",".join(_show(h, p) for h, p in endpoints)
