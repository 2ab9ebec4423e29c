"""The ``xdsd`` command: serve, validate, bootstrap."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from xdsd.settings import AUTHZ_HTTP_PORT


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _percent(value: str) -> float:
    try:
        number = float(value.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage 0..100, got {value!r}") from None
    if not 0 <= number <= 100:
        raise argparse.ArgumentTypeError(f"expected a percentage 0..100, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return int(value)


def _port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1..65535, got {value!r}")
    return int(value)


def _cmd_validate(args: argparse.Namespace) -> int:
    from xdsd.errors import MeshError
    from xdsd.model import load_mesh_file
    from xdsd.model.authentication import protect_secret_files
    from xdsd.settings import default_state_dir

    protect_secret_files([default_state_dir()])  # a login's secret is never one of xdsd's files
    try:
        mesh = load_mesh_file(args.file)
    except MeshError as exc:
        for err in exc.errors:
            print(f"{args.file}: {err}", file=sys.stderr)
        print(f"{args.file}: invalid ({len(exc.errors)} error{'s' if len(exc.errors) != 1 else ''})", file=sys.stderr)
        return 1
    print(f"{args.file}: valid: {mesh.summary()}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from xdsd.app import run_serve

    return run_serve(args)


def _ttl(value: str) -> float:
    from xdsd.auth.tokens import parse_ttl

    try:
        return parse_ttl(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _token(args: argparse.Namespace) -> str | None:
    if args.no_token:
        return None
    if args.token:
        return str(args.token)
    from xdsd.auth.commands import describe, mint

    token, claims = mint(args.state_dir, args.node_id, args.cluster, ttl=args.ttl)
    print(f"xdsd bootstrap: {describe(claims)}", file=sys.stderr)
    return token


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from xdsd.admin.client import AdminClient, fail, operator_token
    from xdsd.status import render_node, render_replicas, render_table, safe

    client = AdminClient(args.admin_address, operator_token(args.token, args.state_dir))
    status, proxies = client.get("/debug/proxies")
    if status != 200 or not isinstance(proxies, list):
        return fail("status", status, proxies)
    if args.node:
        match = [p for p in proxies if p["node_id"] == args.node]
        if not match:
            print(f"xdsd: node {safe(args.node)!r} is not connected", file=sys.stderr)
            return 1
        print(json.dumps(match[0], indent=2) if args.json else render_node(match[0]))
        return 0
    print(json.dumps(proxies, indent=2) if args.json else render_table(proxies))
    if not args.json:
        status, replicas = client.get("/debug/replicas")
        if status == 200 and isinstance(replicas, dict) and replicas.get("store") != "file":
            print(render_replicas(replicas))
    return 0


def _cmd_config_dump(args: argparse.Namespace) -> int:
    import json
    import urllib.parse

    from xdsd.admin.client import AdminClient, fail, operator_token

    client = AdminClient(args.admin_address, operator_token(args.token, args.state_dir))
    status, body = client.get("/debug/config_dump?node=" + urllib.parse.quote(args.node))
    if status != 200:
        return fail("config-dump", status, body)
    print(json.dumps(body, indent=2))
    return 0


def _cmd_config(name: str) -> object:
    def run(args: argparse.Namespace) -> int:
        from xdsd.admin import commands

        return int(getattr(commands, name)(args))

    return run


def _cmd_register(args: argparse.Namespace) -> int:
    from xdsd.register import run

    token = args.token
    if token is None and not args.no_token:
        from xdsd.auth.commands import mint
        from xdsd.registry.instance import default_instance_id

        node_id = args.instance_id or default_instance_id(args.address, args.port)
        token, _ = mint(args.state_dir, node_id, args.service, ttl=args.ttl_token)
    return run(args, token)


def _cmd_token(args: argparse.Namespace) -> int:
    from xdsd.auth.commands import run

    return run(args)


def _embedded_bundle(args: argparse.Namespace) -> bytes | None:
    """The CA bundle that verifies ``xdsd serve``'s own certificate (from the state directory),
    unless the bootstrap is plaintext or names a CA file on the Envoy's machine."""
    if args.xds_plaintext or args.xds_tls_ca:
        return None
    from xdsd.ca import CertificateAuthority
    from xdsd.ca.serving import bundle_path

    written = bundle_path(args.state_dir)  # what the server verifies with (also an operator's CA)
    if written.exists():
        return written.read_bytes()
    return CertificateAuthority.load_or_create(args.state_dir, "mesh").bundle_pem


def _cmd_bootstrap(args: argparse.Namespace) -> int:
    from xdsd.bootstrap import BootstrapOptions, render_text

    xds = args.xds_address or [("127.0.0.1", 18000)]
    opts = BootstrapOptions(
        node_id=args.node_id,
        cluster=args.cluster,
        xds_host=xds[0][0],
        xds_port=xds[0][1],
        xds_more=tuple(xds[1:]),
        admin_address=args.admin_address,
        admin_port=args.admin_port,
        ads=not args.no_ads,
        delta=args.delta,
        token=_token(args),
        xds_tls_ca=args.xds_tls_ca,
        xds_tls_ca_pem=_embedded_bundle(args),
        xds_tls_server_name=args.xds_tls_server_name,
        xds_plaintext=args.xds_plaintext,
        inbound_address=args.inbound_address,
        app_address=args.app_address,
        zone=args.zone,
        authz_http_port=None if args.authz_grpc else args.authz_http_port,
    )
    sys.stdout.write(render_text(opts, fmt=args.format))
    return 0


def _operator_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", help="an operator token (`xdsd token --operator`); default: mint a short-lived one "
                                   "with the key in --state-dir, if it is there")
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xdsd", description="xDS control plane for meshes of VMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the control plane")
    p.add_argument("--config", help="mesh config file (YAML); watched for changes. Required with --store file; "
                                    "with --store etcd://... it only seeds an empty store")
    p.add_argument("--xds-address", type=_host_port, default=("0.0.0.0", 18000), metavar="HOST:PORT",
                   help="gRPC address for xDS (default 0.0.0.0:18000)")
    p.add_argument("--admin-address", type=_host_port, default=("127.0.0.1", 19000), metavar="HOST:PORT",
                   help="HTTP admin address: /metrics /healthz /readyz /debug/* (default 127.0.0.1:19000)")
    p.add_argument("--debounce", type=float, default=0.05, metavar="SECONDS",
                   help="quiet period that coalesces bursts of changes (default 0.05)")
    p.add_argument("--registry-debounce", type=float, default=0.01, metavar="SECONDS",
                   help="registration changes within this window become one revision (default 0.01)")
    p.add_argument("--max-removal", type=_percent, default=50.0, metavar="PERCENT",
                   help="a file revision removing more than this share of the services, gateways or endpoints "
                        "is held until the file stays unchanged for --settle (default 50)")
    p.add_argument("--settle", type=float, default=5.0, metavar="SECONDS",
                   help="how long a held revision's file must stay unchanged before it is applied (default 5)")
    p.add_argument("--history", type=int, default=50, metavar="N",
                   help="accepted config revisions kept in the state directory for `xdsd history`/`rollback` (default 50)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help="CA root, token key (default $XDSD_STATE_DIR or ~/.local/state/xdsd)")
    p.add_argument("--auth", choices=["required", "off"], default="required",
                   help="require a valid node token on every xDS stream (default: required)")
    p.add_argument("--ca-cert", type=Path, metavar="PEM", help="operator CA: signing certificate (+ chain)")
    p.add_argument("--ca-key", type=Path, metavar="PEM", help="operator CA: private key of --ca-cert")
    p.add_argument("--ca-bundle", type=Path, metavar="PEM", help="trust anchors (default: roots in --ca-cert)")
    p.add_argument("--xds-tls-cert", type=Path, metavar="PEM",
                   help="serve xDS over TLS with this certificate instead of one from xdsd's own CA")
    p.add_argument("--xds-tls-key", type=Path, metavar="PEM", help="private key of --xds-tls-cert")
    p.add_argument("--xds-tls-san", action="append", default=[], metavar="NAME",
                   help="another DNS name or IP for xdsd's own serving certificate (repeatable)")
    p.add_argument("--xds-plaintext", action="store_true",
                   help="serve xDS and the authz HTTP port without TLS (private keys then go only to loopback peers)")
    p.add_argument("--max-instances-per-service", type=int, default=1000, metavar="N",
                   help="registered instances per service, and per token (default 1000)")
    p.add_argument("--max-unauthenticated-per-source", type=_positive_int, default=1024, metavar="N",
                   help="xDS connections from one address (IPv6: one /64) not yet authenticated by a token; "
                        "past it the oldest is shed (default 1024; raise it when thousands of proxies "
                        "share one NAT address)")
    p.add_argument("--xds-transport", choices=["h2", "grpcio"], default="h2",
                   help="what serves the gRPC port: h2 on the event loop (default; half the CPU per message) "
                        "or grpcio's asyncio server")
    authz = p.add_mutually_exclusive_group()
    authz.add_argument("--authz-http-address", type=_host_port, default=None, metavar="HOST:PORT",
                       help="answer ext_authz checks over HTTP/1.1 here as well as over gRPC (default: the "
                            f"--xds-address host, port {AUTHZ_HTTP_PORT}; what `xdsd bootstrap` points "
                            "Envoys at; TLS like xDS)")
    authz.add_argument("--no-authz-http", action="store_true",
                       help="answer ext_authz checks over gRPC only (Envoys bootstrapped with --authz-grpc)")
    p.add_argument("--processor-pool", choices=["threads", "processes"], default="threads",
                   help="where the mesh's ext_proc processors run: 4 worker threads of xdsd (default; least "
                        "latency) or 2 worker processes (CPU-heavy processors off xdsd's GIL; a timed-out call "
                        "is ended by SIGALRM, even in a sleep)")
    p.add_argument("--drain-time", type=float, default=5.0, metavar="SECONDS",
                   help="how long a deregistered instance stays DRAINING before it is removed (default 5)")
    p.add_argument("--otlp-endpoint", metavar="HOST:PORT",
                   help="export xdsd's own spans (per config revision; per authz decision) over OTLP/gRPC "
                        "(default $OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("validate", help="check a mesh config file and print its errors")
    p.add_argument("file")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("bootstrap", help="print an Envoy bootstrap that points at xdsd")
    p.add_argument("--node-id", required=True, help="node.id: unique per Envoy")
    p.add_argument("--cluster", required=True, help="node.cluster: the service or gateway this Envoy serves")
    p.add_argument("--xds-address", type=_host_port, action="append", default=None, metavar="HOST:PORT",
                   help="where xdsd's xDS port is (default 127.0.0.1:18000); repeat it for every replica "
                        "(or give a DNS name with one address per replica): Envoy fails over between them")
    p.add_argument("--admin-address", default="127.0.0.1", help="Envoy admin listen address (default 127.0.0.1)")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port (default 9901)")
    p.add_argument("--no-ads", action="store_true",
                   help="use the standalone CDS/LDS (and EDS/RDS) services instead of ADS")
    p.add_argument("--delta", action="store_true", help="use the incremental (DELTA_GRPC) protocol variant")
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help="where the token key is (same default as `xdsd serve`)")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", help="a node token minted earlier (`xdsd token`); default: mint one now")
    token.add_argument("--no-token", action="store_true", help="omit the token (only for `serve --auth off`)")
    p.add_argument("--ttl", type=_ttl, default=365 * 86400.0, metavar="D",
                   help="lifetime of the minted token: 365d, 12h, 30m, 90s (default 365d)")
    p.add_argument("--xds-tls-ca", metavar="PEM",
                   help="verify xdsd with this CA file on the Envoy's machine (default: embed the state "
                        "directory's bundle)")
    p.add_argument("--xds-tls-server-name", metavar="NAME",
                   help="name to verify on xdsd's certificate (default: xdsd; with --xds-tls-ca the xDS host)")
    p.add_argument("--xds-plaintext", action="store_true", help="xdsd serves xDS without TLS (serve --xds-plaintext)")
    p.add_argument("--inbound-address", metavar="IP",
                   help="sidecars: the instance's mesh address (when the service config leaves it open)")
    p.add_argument("--app-address", metavar="IP",
                   help="sidecars: where this instance's app listens (overrides the service's app_address)")
    p.add_argument("--zone", help="node.locality.zone: prefer endpoints in this zone, fail over to the others")
    authz = p.add_mutually_exclusive_group()
    authz.add_argument("--authz-http-port", type=_port, default=AUTHZ_HTTP_PORT, metavar="PORT",
                       help="ask xdsd's ext_authz over HTTP/1.1 on this port of the xDS host (xdsd serve "
                            f"--authz-http-address; default {AUTHZ_HTTP_PORT}): a fifth of xdsd's CPU per "
                            "check of gRPC")
    authz.add_argument("--authz-grpc", action="store_true",
                       help="ask xdsd's ext_authz over gRPC on the xDS port instead (xdsd serve --no-authz-http)")
    p.set_defaults(func=_cmd_bootstrap)

    p = sub.add_parser("status", help="per-proxy sync status, like proxy-status")
    p.add_argument("--admin-address", type=_host_port, default=("127.0.0.1", 19000), metavar="HOST:PORT")
    p.add_argument("--node", metavar="ID", help="one proxy in detail")
    p.add_argument("--json", action="store_true")
    _operator_flags(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("config-dump", help="print as JSON what xdsd serves one node")
    p.add_argument("--node", required=True, metavar="ID")
    p.add_argument("--admin-address", type=_host_port, default=("127.0.0.1", 19000), metavar="HOST:PORT")
    _operator_flags(p)
    p.set_defaults(func=_cmd_config_dump)

    p = sub.add_parser("diff", help="what a mesh file would change, per node group, against what xdsd serves")
    p.add_argument("file")
    p.add_argument("--admin-address", type=_host_port, default=("127.0.0.1", 19000), metavar="HOST:PORT")
    p.add_argument("--json", action="store_true")
    _operator_flags(p)
    p.set_defaults(func=_cmd_config("diff"))

    p = sub.add_parser("apply", help="validate a mesh file, show the diff, make it the served config, wait for the proxies")
    p.add_argument("file")
    p.add_argument("--admin-address", type=_host_port, default=("127.0.0.1", 19000), metavar="HOST:PORT")
    p.add_argument("--allow-removal", action="store_true",
                   help="apply at once even if it removes more than serve --max-removal of the mesh")
    p.add_argument("--no-wait", action="store_true", help="do not wait for the proxies' ACKs or NACKs")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for every proxy to ACK or NACK (default 30)")
    _operator_flags(p)
    p.set_defaults(func=_cmd_config("apply"))

    p = sub.add_parser("history", help="the accepted config revisions; `history show REV` prints one")
    p.add_argument("action", nargs="?", choices=["show"])
    p.add_argument("revision", nargs="?", type=int)
    p.add_argument("--admin-address", type=_host_port, default=("127.0.0.1", 19000), metavar="HOST:PORT")
    _operator_flags(p)
    p.set_defaults(func=_cmd_config("history"))

    p = sub.add_parser("rollback", help="make an earlier config revision current again (default: the one before)")
    p.add_argument("--to", type=int, metavar="REV")
    p.add_argument("--admin-address", type=_host_port, default=("127.0.0.1", 19000), metavar="HOST:PORT")
    p.add_argument("--no-wait", action="store_true", help="do not wait for the proxies' ACKs or NACKs")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS")
    _operator_flags(p)
    p.set_defaults(func=_cmd_config("rollback"))

    p = sub.add_parser("register", help="register an instance, heartbeat until interrupted, then deregister")
    p.add_argument("--service", required=True)
    p.add_argument("--address", required=True, help="the instance's IP address or host name")
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--ttl", default="10s", help="time to live without a heartbeat (default 10s)")
    p.add_argument("--weight", type=int, default=1)
    p.add_argument("--zone")
    p.add_argument("--label", action="append", metavar="KEY=VALUE")
    p.add_argument("--instance-id", help="default ADDRESS:PORT")
    p.add_argument("--admin-address", type=_host_port, default=("127.0.0.1", 19000), metavar="HOST:PORT")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", help="a node token for the service (`xdsd token`); default: mint one")
    token.add_argument("--no-token", action="store_true", help="send no token (only for `serve --auth off`)")
    p.add_argument("--token-ttl", dest="ttl_token", type=_ttl, default=365 * 86400.0, metavar="D",
                   help="lifetime of the token minted when --token is not given (default 365d)")
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR")
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("token", help="mint, list and revoke tokens; rotate the signing key",
                       description="xdsd token --node-id ID --cluster NAME | --operator  [--ttl D]: mint a token; "
                                   "xdsd token list [--all]; xdsd token revoke --id ID | --node-id ID; "
                                   "xdsd token rotate-key; xdsd token retire-key [--kid KID]")
    p.add_argument("action", nargs="?", choices=["list", "revoke", "rotate-key", "retire-key"],
                   help="what to do (default: mint a token)")
    p.add_argument("--node-id", help="the node (mint), or revoke every token of this node issued until now")
    p.add_argument("--cluster", help="the node's service or gateway (mint)")
    p.add_argument("--operator", action="store_true", help="mint an operator token (CSDS, /debug/*, xdsd status)")
    p.add_argument("--ttl", type=_ttl, default=365 * 86400.0, metavar="D",
                   help="lifetime: 365d, 12h, 30m, 90s (default 365d); the expiry is printed on stderr")
    p.add_argument("--id", help="revoke: the token id (from `xdsd token list` or the mint message)")
    p.add_argument("--kid", help="retire-key: only this previous key (default: every previous key)")
    p.add_argument("--all", action="store_true", help="list: also expired, revoked and retired-key tokens")
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR")
    p.set_defaults(func=_cmd_token)
    from xdsd.store.spec import add_store_arguments

    for name, sub_parser in sub.choices.items():
        if name in STORE_COMMANDS:
            add_store_arguments(sub_parser)
    return parser


STORE_COMMANDS = ("serve", "bootstrap", "status", "config-dump", "diff", "apply", "history", "rollback", "register", "token")


def _from_store(args: argparse.Namespace) -> int | None:
    """A command other than serve with ``--store etcd://``: the mesh's CA and token key come from
    etcd into the state directory first (so tokens are minted with the shared key), and ``token
    revoke``, ``rotate-key`` and ``retire-key`` write to etcd. Returns an exit code when the command is done or cannot run."""
    from xdsd.store.spec import StoreSpecError, store_from_args

    try:
        spec = store_from_args(args)
    except StoreSpecError as exc:
        print(f"xdsd: {exc}", file=sys.stderr)
        return 2
    if not spec.etcd:
        return None
    import asyncio

    from xdsd.errors import StoreUnavailable
    from xdsd.store.etcd import EtcdClient
    from xdsd.store.keys import Keys
    from xdsd.store.secrets import NotInitialized, retire_token_keys, revoke, rotate_token_key, sync_secrets

    async def run() -> int | None:
        client, keys = EtcdClient(spec), Keys(spec.prefix)
        try:
            await sync_secrets(client, keys, args.state_dir, create=False)
            if args.command == "token" and args.action == "revoke" and (args.id or args.node_id):
                await revoke(client, keys, token_id=args.id, node_id=args.node_id)
                what = [f"token {args.id}"] if args.id else []
                what += [f"every token of node {args.node_id!r} issued until now"] if args.node_id else []
                print(f"revoked {' and '.join(what)} in {client.where} (every replica ends their streams "
                      f"within a second)")
                return 0
            if args.command == "token" and args.action == "rotate-key":
                old, new = await rotate_token_key(client, keys)
                await sync_secrets(client, keys, args.state_dir, create=False)
                print(f"new signing key {new} in {client.where}; tokens of key {old} stay valid until "
                      f"`xdsd token retire-key` (every replica accepts it within a second)")
                return 0
            if args.command == "token" and args.action == "retire-key":
                retired = await retire_token_keys(client, keys, args.kid)
                await sync_secrets(client, keys, args.state_dir, create=False)
                if not retired:
                    print("xdsd token retire-key: no previous key to retire", file=sys.stderr)
                    return 1
                print(f"retired key(s) {', '.join(retired)} in {client.where}: their tokens are refused from now on "
                      f"(every replica ends their streams within a second)")
                return 0
            return None
        except (StoreUnavailable, NotInitialized) as exc:
            print(f"xdsd: {exc}", file=sys.stderr)
            return 1
        finally:
            await client.close()

    return asyncio.run(run())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "state_dir", "absent") is None:
        from xdsd.settings import default_state_dir

        args.state_dir = default_state_dir()
    if args.command != "serve" and getattr(args, "store", None) is not None:
        done = _from_store(args)
        if done is not None:
            return done
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
