"""The etcd client over TLS with a client certificate and a user (``--etcd-cacert``, ``--etcd-cert``/
``--etcd-key``, ``--etcd-user``/``--etcd-password-file``) against a real etcd that requires both."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from aetcd import rpc

from tests.support.certs import server_cert
from tests.support.etcd import EtcdCluster, etcd_available
from tests.support.procs import wait_for
from xdsd.ca import CertificateAuthority
from xdsd.errors import StoreUnavailable
from xdsd.store.etcd import EtcdClient
from xdsd.store.spec import StoreSpec, parse_endpoints


@pytest.fixture
def secure_etcd(tmp_path: Path) -> Iterator[tuple[EtcdCluster, Path, Path, Path]]:
    """One etcd member on https, requiring a client certificate: (cluster, CA bundle, client cert, key)."""
    if not etcd_available():
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    cert, key, bundle = server_cert(tmp_path)
    ca = CertificateAuthority.load_or_create(tmp_path / "xds-ca", "xds")
    svid = ca.issue("spiffe://test/service/etcd-client", dt.timedelta(hours=1))
    client_cert, client_key = tmp_path / "client.pem", tmp_path / "client.key"
    client_cert.write_bytes(svid.cert_chain_pem)
    client_key.write_bytes(svid.key_pem)
    cluster = EtcdCluster(tmp_path / "etcd", 1)
    cluster.workdir.mkdir()
    m = cluster.members[0]
    command = m.command(cluster.initial, cluster.token)
    command = [c.replace(f"http://127.0.0.1:{m.client_port}", f"https://127.0.0.1:{m.client_port}") for c in command]
    command += ["--cert-file", str(cert), "--key-file", str(key), "--trusted-ca-file", str(bundle), "--client-cert-auth"]
    from tests.support.procs import Proc, port_open

    m.proc = Proc("etcd-tls", command, cluster.workdir / "etcd.log")
    m.proc.start()
    try:
        wait_for(lambda: port_open("127.0.0.1", m.client_port), "etcd to listen", 30)
        yield cluster, bundle, client_cert, client_key
    finally:
        m.proc.stop()


def _spec(cluster: EtcdCluster, bundle: Path, cert: Path, key: Path, user: str | None = None,
          password: Path | None = None) -> StoreSpec:
    return StoreSpec("etcd", parse_endpoints(cluster.store_url), "/x", bundle, cert, key, user, password)


async def _enable_auth(spec: StoreSpec, password: str) -> None:
    client = EtcdClient(spec)
    try:
        auth = rpc.AuthStub(client.channel)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=password), timeout=5)
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
        await auth.AuthEnable(rpc.AuthEnableRequest(), timeout=5)
    finally:
        await client.close()


async def test_tls_client_certificate_and_user(secure_etcd: tuple[EtcdCluster, Path, Path, Path], tmp_path: Path) -> None:
    cluster, bundle, cert, key = secure_etcd
    plain = EtcdClient(StoreSpec("etcd", parse_endpoints(cluster.store_url), "/x"), timeout=2)
    try:  # plaintext to a TLS port: refused, naming etcd
        with pytest.raises(StoreUnavailable, match="etcd 127.0.0.1"):
            await plain.put(b"/x/a", b"1")
    finally:
        await plain.close()
    client = EtcdClient(_spec(cluster, bundle, cert, key))
    try:
        await client.put(b"/x/a", b"1")
        assert (await client.get(b"/x/a")).value == b"1"  # type: ignore[union-attr]
    finally:
        await client.close()
    # A user: the right password works for every call, the watch included; a wrong one is named.
    await _enable_auth(_spec(cluster, bundle, cert, key), "s3cret")
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("s3cret\n")
    bad.write_text("nope\n")
    client = EtcdClient(_spec(cluster, bundle, cert, key, "root", good))
    try:
        start = await client.put(b"/x/b", b"2")
        lease = await client.grant(5)
        assert await client.keepalive(lease) > 0
        await client.put(b"/x/c", b"3", lease)
        batch = await asyncio.wait_for(anext(client.watch(b"/x/", start + 1)), 10)
        assert batch[0].kv.key == b"/x/c"
    finally:
        await client.close()
    wrong = EtcdClient(_spec(cluster, bundle, cert, key, "root", bad), timeout=2)
    try:
        with pytest.raises(StoreUnavailable, match="etcd 127.0.0.1:[0-9]+: .*authentication failed") as refused:
            await wrong.put(b"/x/d", b"4")
        print(refused.value)
    finally:
        await wrong.close()
