"""`xdsd serve`'s settings: one typed object whose defaults are the command line's."""

from __future__ import annotations

from pathlib import Path

from xdsd.cli import build_parser
from xdsd.settings import ServeSettings, default_state_dir


def test_command_line_defaults_are_the_settings_defaults() -> None:
    args = build_parser().parse_args(["serve", "--config", "mesh.yaml"])
    from_cli = ServeSettings.from_args(args)
    assert from_cli == ServeSettings(config=Path("mesh.yaml"), state_dir=default_state_dir())


def test_flags_reach_the_settings() -> None:
    args = build_parser().parse_args([
        "serve", "--config", "m.yaml", "--max-removal", "20", "--settle", "2", "--xds-tls-san", "a", "--xds-tls-san",
        "10.0.0.1", "--xds-plaintext", "--auth", "off", "--xds-address", "[::]:1", "--history", "7"])
    s = ServeSettings.from_args(args)
    assert (s.max_removal, s.settle, s.xds_tls_san, s.xds_plaintext, s.auth_required, s.xds_address, s.history) == (
        0.2, 2.0, ("a", "10.0.0.1"), True, False, ("::", 1), 7)
    assert s.authz_http_address == ("::", 18001)  # ext_authz over HTTP: the xDS host, port 18001


def test_authz_over_http_is_on_unless_turned_off() -> None:
    def authz(*flags: str) -> tuple[str, int] | None:
        return ServeSettings.from_args(build_parser().parse_args(["serve", "--config", "m.yaml", *flags])).authz_http_address

    assert authz() == ("0.0.0.0", 18001)
    assert authz("--xds-address", "127.0.0.1:0") == ("127.0.0.1", 0)  # an ephemeral xDS port: an ephemeral one
    assert authz("--authz-http-address", "10.0.0.1:9") == ("10.0.0.1", 9)
    assert authz("--no-authz-http") is None


def test_unauthenticated_connections_per_source_can_be_raised_for_a_nat() -> None:
    import pytest

    def per_source(*flags: str) -> int:
        return ServeSettings.from_args(build_parser().parse_args(["serve", "--config", "m.yaml", *flags])).max_unauthenticated_per_source

    assert per_source() == 1024
    assert per_source("--max-unauthenticated-per-source", "8000") == 8000
    for bad in ("0", "-3", "many"):
        with pytest.raises(SystemExit):
            per_source("--max-unauthenticated-per-source", bad)
