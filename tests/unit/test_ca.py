"""SVID shape and rotation timing of the built-in CA."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from xdsd.ca import CertificateAuthority, IdentityStore
from xdsd.ca.authority import MAX_BACKDATE

SID = "spiffe://example.org/service/reviews"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "state", "example.org")


def leaf_of(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem)[0]


def test_svid_has_exactly_one_uri_san_and_is_not_a_ca(ca: CertificateAuthority) -> None:
    svid = ca.issue(SID, dt.timedelta(hours=1))
    leaf = leaf_of(svid.cert_chain_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SID]
    assert len(list(san)) == 1
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.crl_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_svid_lifetime_and_backdate(ca: CertificateAuthority) -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    svid = ca.issue(SID, dt.timedelta(hours=1), now=now)
    leaf = leaf_of(svid.cert_chain_pem)
    assert leaf.not_valid_after_utc == now + dt.timedelta(hours=1)
    assert now - MAX_BACKDATE <= leaf.not_valid_before_utc <= now
    short = ca.issue(SID, dt.timedelta(seconds=2), now=now)
    # a 2-second SVID is backdated by at most a quarter of its life
    assert now - dt.timedelta(seconds=1) <= short.not_before <= now


def test_svid_chains_to_the_root(ca: CertificateAuthority) -> None:
    svid = ca.issue(SID, dt.timedelta(minutes=5))
    leaf = leaf_of(svid.cert_chain_pem)
    root = x509.load_pem_x509_certificates(ca.bundle_pem)[0]
    leaf.verify_directly_issued_by(root)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True


def test_root_is_kept_in_the_state_dir(tmp_path: Path) -> None:
    a = CertificateAuthority.load_or_create(tmp_path, "example.org")
    b = CertificateAuthority.load_or_create(tmp_path, "example.org")
    assert a.bundle_pem == b.bundle_pem
    assert oct((tmp_path / "ca" / "root.key").stat().st_mode & 0o777) == "0o600"


def test_operator_ca_with_an_intermediate(tmp_path: Path) -> None:
    root = CertificateAuthority.load_or_create(tmp_path / "root", "example.org")
    # Make an intermediate signed by the root, and use it as the operator's signing CA.
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    inter = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.signing_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root.signing_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_file, key_file = tmp_path / "inter.pem", tmp_path / "inter.key"
    cert_file.write_bytes(inter.public_bytes(serialization.Encoding.PEM) + root.bundle_pem)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ca = CertificateAuthority.from_files(cert_file, key_file)
    svid = ca.issue(SID, dt.timedelta(minutes=5))
    chain = x509.load_pem_x509_certificates(svid.cert_chain_pem)
    assert len(chain) == 2  # leaf + intermediate, never the root
    chain[0].verify_directly_issued_by(chain[1])
    assert ca.bundle_pem == root.bundle_pem


def test_rotation_at_half_life(ca: CertificateAuthority) -> None:
    store = IdentityStore(ca, dt.timedelta(seconds=10))
    assert store.ensure("example.org", {SID})
    first = store.credentials.svids[SID]
    # Half of what is left of its validity when issued (X.509 times have whole seconds).
    assert first.rotate_at == first.issued_at + (first.not_after - first.issued_at) / 2
    assert first.issued_at + dt.timedelta(seconds=4.5) <= first.rotate_at <= first.issued_at + dt.timedelta(seconds=5)
    assert store.rotate_due(first.rotate_at - dt.timedelta(milliseconds=1)) == []
    assert store.rotate_due(first.rotate_at) == [SID]
    second = store.credentials.svids[SID]
    assert second.serial != first.serial
    assert store.next_rotation() == second.rotate_at


def test_identities_come_and_go_with_the_mesh(ca: CertificateAuthority) -> None:
    store = IdentityStore(ca, dt.timedelta(hours=1))
    other = "spiffe://example.org/service/ratings"
    store.ensure("example.org", {SID, other})
    assert set(store.credentials.svids) == {SID, other}
    assert not store.ensure("example.org", {SID, other})  # nothing new: nothing reissued
    store.ensure("example.org", {SID})
    assert set(store.credentials.svids) == {SID}


def test_aligned_svids_are_identical_across_replicas_and_rotate_per_period(tmp_path: Path) -> None:
    """Replicas sharing one CA issue byte-identical SVIDs within a half-lifetime period (the same
    SDS versions wherever an Envoy connects) and new ones at the period's end."""
    import datetime as _dt

    from xdsd.ca import CertificateAuthority as _Ca
    from xdsd.ca.identities import IdentityStore

    one = _Ca.load_or_create(tmp_path, "mesh")
    two = _Ca.load_or_create(tmp_path, "mesh")  # another replica: the same root from the store
    sid, life = "spiffe://mesh.local/service/reviews", _dt.timedelta(hours=1)
    t = _dt.datetime(2026, 1, 1, 10, 7, 13, tzinfo=_dt.UTC)
    a = one.issue(sid, life, t, aligned=True)
    b = two.issue(sid, life, t + _dt.timedelta(minutes=20), aligned=True)
    assert (a.cert_chain_pem, a.key_pem) == (b.cert_chain_pem, b.key_pem)
    assert a.issued_at == _dt.datetime(2026, 1, 1, 10, 0, tzinfo=_dt.UTC) and a.rotate_at == a.issued_at + life / 2
    c = one.issue(sid, life, a.rotate_at, aligned=True)
    assert c.cert_chain_pem != a.cert_chain_pem and c.key_pem != a.key_pem and c.serial != a.serial
    assert one.issue("spiffe://mesh.local/service/other", life, t, aligned=True).key_pem != a.key_pem
    unaligned = one.issue(sid, life, t)
    assert unaligned.key_pem != one.issue(sid, life, t).key_pem  # the default stays random
    store = IdentityStore(one, life, aligned=True)
    store.ensure("mesh.local", {sid})
    due = store.credentials.svids[sid].rotate_at
    assert store.rotate_due(due - _dt.timedelta(seconds=1)) == []
    assert store.rotate_due(due) == [sid]
    assert store.credentials.svids[sid].rotate_at == due + life / 2
