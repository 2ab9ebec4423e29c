"""Synthetic meshes for the benchmarks: S services x E endpoints, every service with a sidecar.

Service ``svc-0000`` is the *hot* service: every sidecar calls it, so a change to its endpoints
reaches every proxy (fan-out). Each sidecar also calls ``upstreams - 1`` neighbours on a ring.
Endpoint addresses are unique IPs in 10.0.0.0/8, so every service uses EDS.

    python -m bench.meshgen --services 100 --endpoints 10 > mesh.yaml
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

import yaml

BASE = int(ipaddress.IPv4Address("10.0.0.0"))
INBOUND_PORT = 15006
APP_PORT = 8080


def service_name(i: int) -> str:
    return f"svc-{i:04d}"


def endpoint_address(service: int, index: int, per_service: int) -> str:
    return str(ipaddress.IPv4Address(BASE + 1 + service * per_service + index))


def mesh(services: int = 100, endpoints: int = 10, upstreams: int = 5) -> dict[str, Any]:
    """The mesh as a plain dict (what ``yaml.safe_load`` would give). ``upstreams`` counts the hot
    service; a single-service mesh gets one client service ``client`` calling it."""
    out: dict[str, Any] = {"mesh": {"trust_domain": "bench.local"}, "services": {}}
    names = [service_name(i) for i in range(services)]
    for i, name in enumerate(names):
        calls = {names[0]} | {names[(i + k) % services] for k in range(1, upstreams)}
        calls.discard(name)
        out["services"][name] = {
            "endpoints": [{"address": endpoint_address(i, j, endpoints), "port": INBOUND_PORT} for j in range(endpoints)],
            "sidecar": {
                "inbound": {"port": INBOUND_PORT},
                "app_port": APP_PORT,
                "upstreams": {u: 20000 + k for k, u in enumerate(sorted(calls))},
            },
        }
    if services == 1:
        out["services"]["client"] = {
            "endpoints": [{"address": "10.255.255.254", "port": INBOUND_PORT}],
            "sidecar": {"inbound": {"port": INBOUND_PORT}, "app_port": APP_PORT, "upstreams": {names[0]: 20000}},
        }
    return out


def client_services(m: dict[str, Any]) -> list[str]:
    """The services whose sidecars receive the hot service (every sidecar that calls it)."""
    hot = service_name(0)
    return [n for n, s in m["services"].items() if hot in s["sidecar"]["upstreams"]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, default=100)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--upstreams", type=int, default=5)
    a = p.parse_args(argv)
    yaml.safe_dump(mesh(a.services, a.endpoints, a.upstreams), sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
