"""The CA root and the token signing key in etcd: created once by the first replica (a
compare-and-swap on "the key does not exist"), never overwritten, and copied into each replica's
state directory (and into the state directory of a command run with ``--store etcd://``), where
the CA, the token signer and ``xdsd token`` read them as before. A state directory that already
holds a key or a CA (a single xdsd moving to etcd) offers its own; the first offer wins.

Revocations live in etcd too: ``xdsd token revoke`` swaps the new list in; every replica copies it
into its state directory when its watch sees it (``Access.refresh`` picks it up)."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from xdsd.auth import ledger
from xdsd.auth.tokens import KEY_FILE
from xdsd.store.etcd import EtcdClient
from xdsd.store.keys import Keys


class NotInitialized(Exception):
    pass


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.etcd{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _local_token_key(state_dir: Path) -> bytes | None:
    try:
        return (state_dir / KEY_FILE).read_bytes()
    except OSError:
        return None


def _local_ca(state_dir: Path) -> bytes | None:
    try:
        cert = (state_dir / "ca" / "root.pem").read_bytes()
        key = (state_dir / "ca" / "root.key").read_bytes()
    except OSError:
        return None
    return json.dumps({"cert": cert.decode(), "key": key.decode()}).encode()


def _new_ca() -> bytes:
    from xdsd.ca import CertificateAuthority

    with tempfile.TemporaryDirectory(prefix="xdsd-ca-") as tmp:
        CertificateAuthority.load_or_create(Path(tmp), "mesh")
        made = _local_ca(Path(tmp))
    assert made is not None
    return made


def _new_token_key() -> bytes:
    import secrets

    return secrets.token_bytes(32)


async def sync_secrets(client: EtcdClient, keys: Keys, state_dir: Path, *, create: bool) -> None:
    """Make ``state_dir`` hold the mesh's token key and CA root from etcd (creating them in etcd
    first if ``create`` and no replica has). NotInitialized if absent and not ``create``."""
    token = await _shared(client, keys.token_key, lambda: _local_token_key(state_dir) or _new_token_key(), create)
    ca = await _shared(client, keys.ca, lambda: _local_ca(state_dir) or _new_ca(), create)
    pems = json.loads(ca)
    await asyncio.to_thread(_write_private, state_dir / KEY_FILE, token)
    await asyncio.to_thread(_write_private, state_dir / "ca" / "root.key", pems["key"].encode())
    await asyncio.to_thread(_write_private, state_dir / "ca" / "root.pem", pems["cert"].encode())
    kv = await client.get(keys.revocations)
    if kv is not None:
        await asyncio.to_thread(write_revocations, state_dir, kv.value)


async def _shared(client: EtcdClient, key: bytes, make: Callable[[], bytes], create: bool) -> bytes:
    kv = await client.get(key)
    if kv is not None:
        return kv.value
    if not create:
        raise NotInitialized(f"{client.where} holds no {key.decode()}: start an xdsd replica with this "
                             f"--store and --etcd-prefix first")
    offer = await asyncio.to_thread(make)
    return await client.create(key, offer)


def write_revocations(state_dir: Path, value: bytes) -> None:
    """etcd's revocation list -> ``tokens/revoked.json`` (ignored if it is not a valid list)."""
    try:
        data = json.loads(value)
    except ValueError:
        return
    rev = ledger.Revocations.from_json(data)
    if ledger.Revocations.load(state_dir).as_json() != rev.as_json():
        rev.save(state_dir)


async def revoke(client: EtcdClient, keys: Keys, *, token_id: str | None, node_id: str | None) -> ledger.Revocations:
    """Add a revocation to etcd's list (a compare-and-swap, retried while others write)."""
    while True:
        kv = await client.get(keys.revocations)
        try:
            current = json.loads(kv.value) if kv is not None else {}
        except ValueError:  # written by hand: replaced by a valid list
            current = {}
        rev = ledger.Revocations.from_json(current)
        now = time.time()
        if token_id:
            rev.ids[token_id] = now
        if node_id:
            rev.nodes[node_id] = now
        value = json.dumps(rev.as_json(), sort_keys=True).encode()
        done, _ = await client.swap(keys.revocations, value, kv.mod_revision if kv is not None else 0)
        if done:
            return rev
