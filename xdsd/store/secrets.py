"""The CA root and the token signing key in etcd: created once by the first replica (a
compare-and-swap on "the key does not exist"; the CA never overwritten, the token key only by a
rotation, below), and copied into each replica's
state directory (and into the state directory of a command run with ``--store etcd://``), where
the CA, the token signer and ``xdsd token`` read them as before. A state directory that already
holds a key or a CA (a single xdsd moving to etcd) offers its own; the first offer wins.

The token key rotates as with the state directory (``xdsd token rotate-key --store etcd://...``): one
transaction, a compare-and-swap on the current key, keeps it under ``secrets/token-keys/<kid>`` and
puts a new one in its place; ``retire-key`` deletes keys from ``secrets/token-keys/`` (never the
current one). Every replica mirrors both into its state directory (``token.key``, ``token-keys/``)
when its watch sees them, where ``Access.refresh`` picks them up: streams of a retired key end.

Revocations live in etcd too: ``xdsd token revoke`` swaps the new list in; every replica copies it
into its state directory when its watch sees it (``Access.refresh`` picks it up)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from xdsd.auth import ledger
from xdsd.auth.tokens import KEY_FILE, PREVIOUS_KEYS_DIR, key_id
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
    return secrets.token_bytes(32)


async def sync_secrets(client: EtcdClient, keys: Keys, state_dir: Path, *, create: bool) -> None:
    """Make ``state_dir`` hold the mesh's token key and CA root from etcd (creating them in etcd
    first if ``create`` and no replica has). NotInitialized if absent and not ``create``."""
    token = await _shared(client, keys.token_key, lambda: _local_token_key(state_dir) or _new_token_key(), create)
    ca = await _shared(client, keys.ca, lambda: _local_ca(state_dir) or _new_ca(), create)
    pems = json.loads(ca)
    await asyncio.to_thread(_write_private, state_dir / KEY_FILE, token)
    _, previous = await client.list(keys.previous_token_keys)
    await asyncio.to_thread(mirror_previous_keys, state_dir, {kv.key[len(keys.previous_token_keys):]: kv.value
                                                              for kv in previous})
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


# -- the token key: rotation, retirement, and their copies in a state directory ----------------

_KID_RE = re.compile(r"[0-9a-f]{12}")


def previous_key_kid(kid: bytes, value: bytes) -> str | None:
    """The key id of a previous key read from etcd, if it is one (a key of its id; else ignored)."""
    text = kid.decode(errors="replace")
    return text if _KID_RE.fullmatch(text) and len(value) >= 32 and key_id(value) == text else None


def write_token_key(state_dir: Path, value: bytes) -> None:
    if len(value) >= 32:
        _write_private(state_dir / KEY_FILE, value)


def write_previous_key(state_dir: Path, kid: bytes, value: bytes) -> None:
    name = previous_key_kid(kid, value)
    if name is not None:
        _write_private(state_dir / PREVIOUS_KEYS_DIR / f"{name}.key", value)


def remove_previous_key(state_dir: Path, kid: bytes) -> None:
    text = kid.decode(errors="replace")
    if _KID_RE.fullmatch(text):
        (state_dir / PREVIOUS_KEYS_DIR / f"{text}.key").unlink(missing_ok=True)


def mirror_previous_keys(state_dir: Path, previous: dict[bytes, bytes]) -> None:
    """Make ``token-keys/`` hold exactly etcd's previous keys (what another replica retired goes)."""
    keep = set()
    for kid, value in previous.items():
        write_previous_key(state_dir, kid, value)
        keep.add(kid.decode(errors="replace"))
    folder = state_dir / PREVIOUS_KEYS_DIR
    for path in folder.glob("*.key") if folder.is_dir() else ():
        if path.stem not in keep:
            path.unlink(missing_ok=True)


async def rotate_token_key(client: EtcdClient, keys: Keys) -> tuple[str, str]:
    """A new signing key in etcd; the current one kept as a previous key (its tokens still verify).
    A compare-and-swap on the current key (retried if another rotation came first). Returns (old key
    id, new key id)."""
    while True:
        kv = await client.get(keys.token_key)
        if kv is None:
            raise NotInitialized(f"{client.where} holds no {keys.token_key.decode()}: start an xdsd replica with "
                                 f"this --store and --etcd-prefix first")
        old, new = key_id(kv.value), _new_token_key()
        done, _ = await client.swap(keys.token_key, new, kv.mod_revision,
                                    also=((keys.previous_token_key(old), kv.value),))
        if done:
            return old, key_id(new)


async def retire_token_keys(client: EtcdClient, keys: Keys, kid: str | None = None) -> list[str]:
    """Delete previous keys from etcd (all, or the one with id ``kid``): their tokens are refused by
    every replica from then on. The current key is never retired. Returns the retired key ids."""
    _, previous = await client.list(keys.previous_token_keys)
    retired = []
    for kv in previous:
        name = kv.key[len(keys.previous_token_keys):].decode(errors="replace")
        if kid is None or name == kid:
            await client.delete(kv.key)
            retired.append(name)
    return sorted(retired)
