"""The TLS of xdsd's own ports (xDS and the authz HTTP port): the contexts the servers use, made from
the operator's certificate or xdsd's own (``ca.serving``), and renewed in place."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from pathlib import Path

import grpc

from xdsd.ca import CertificateAuthority
from xdsd.ca.serving import ServingFiles, ensure_serving_certificate, renew_at, serving_names
from xdsd.settings import ServeSettings
from xdsd.transport.server import server_tls


class ServingTls:
    """The TLS of xdsd's own ports (xDS and the authz HTTP port): the operator's certificate
    (``--xds-tls-cert``/``--xds-tls-key``), else one from xdsd's CA kept in the state directory and
    renewed before it expires. ``None`` contexts: ``--xds-plaintext``."""

    def __init__(self, settings: ServeSettings, ca: CertificateAuthority) -> None:
        self.settings = settings
        self.ca = ca
        self.plaintext = settings.xds_plaintext
        self.operator = bool(settings.xds_tls_cert or settings.xds_tls_key)
        if self.operator and not (settings.xds_tls_cert and settings.xds_tls_key):
            raise SystemExit("xdsd: --xds-tls-cert and --xds-tls-key go together")
        if self.operator and self.plaintext:
            raise SystemExit("xdsd: --xds-plaintext and --xds-tls-cert exclude each other")
        self.files: ServingFiles | None = None
        self.cert: Path | None = None
        self.key: Path | None = None
        self._contexts: list[ssl.SSLContext] = []
        if self.plaintext:
            return
        if self.operator:
            assert settings.xds_tls_cert is not None and settings.xds_tls_key is not None
            self.cert, self.key = Path(settings.xds_tls_cert), Path(settings.xds_tls_key)
        else:
            self.ensure()

    def ensure(self) -> bool:
        """Issue or renew xdsd's own certificate if due; reload it into the live contexts."""
        if self.plaintext or self.operator:
            return False
        dns, ips = serving_names(self.settings.xds_address[0], self.settings.xds_tls_san)
        self.files, issued = ensure_serving_certificate(self.ca, self.settings.state_dir, dns, ips)
        self.cert, self.key = self.files.cert, self.files.key
        if issued:
            for ctx in self._contexts:
                ctx.load_cert_chain(self.cert, self.key)  # new handshakes use it; live connections keep theirs
        return issued

    def grpc_context(self) -> ssl.SSLContext | None:
        if self.cert is None or self.key is None:
            return None
        ctx = server_tls(str(self.cert), str(self.key))
        self._contexts.append(ctx)
        return ctx

    def http_context(self) -> ssl.SSLContext | None:
        if self.cert is None or self.key is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        self._contexts.append(ctx)
        return ctx

    def grpcio_credentials(self) -> grpc.ServerCredentials | None:
        """grpcio's server: credentials that pick up a renewed certificate for new handshakes."""
        if self.cert is None or self.key is None:
            return None
        loaded: dict[str, object] = {}

        def config() -> grpc.ServerCertificateConfiguration | None:
            assert self.cert is not None and self.key is not None
            stamp = (self.cert.stat().st_mtime_ns, self.key.stat().st_mtime_ns)
            if loaded.get("stamp") == stamp:
                return None
            loaded["stamp"] = stamp
            return grpc.ssl_server_certificate_configuration([(self.key.read_bytes(), self.cert.read_bytes())])

        initial = config()
        assert initial is not None
        return grpc.dynamic_ssl_server_credentials(initial, config)

    async def renew_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.ensure()
            wait = 3600.0
            if self.files is not None:
                wait = max(1.0, min(wait, (renew_at(self.files) - dt.datetime.now(dt.UTC)).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
