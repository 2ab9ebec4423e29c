"""A small asyncio etcd v3 client: range, put, compare-and-swap, leases, watch.

Built on grpcio with the etcd API stubs that ``aetcd`` ships (``aetcd.rpc``). aetcd's own ``Client``
connects to one member over plaintext only; xdsd needs every member of the cluster behind one
channel (round-robin, so a member going down changes nothing), TLS, user/password auth, and a
deadline on every call (a cluster without quorum answers nothing: a write must fail in bounded time,
naming etcd, rather than hang a registration)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from aetcd import rpc

from xdsd.errors import StoreUnavailable
from xdsd.store.spec import StoreSpec, grpc_target

log = logging.getLogger(__name__)

# Every unary call: a cluster without a leader times a write out after ~7 s itself; say so sooner.
CALL_TIMEOUT = 3.0
_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


class Compacted(Exception):
    """The revision a watch started from has been compacted away: list again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"etcd compacted past the watched revision (compact revision {revision})")
        self.revision = revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class Event:
    deleted: bool
    kv: KeyValue


def _kv(kv: rpc.KeyValue) -> KeyValue:
    return KeyValue(kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.lease)


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class EtcdClient:
    def __init__(self, spec: StoreSpec, timeout: float = CALL_TIMEOUT) -> None:
        self.spec = spec
        self.timeout = timeout
        self.where = "etcd " + ",".join(f"{h}:{p}" for h, p in spec.endpoints)
        self._channel: grpc.aio.Channel | None = None
        self._metadata: tuple[tuple[str, str], ...] | None = None
        self._lock = asyncio.Lock()

    # -- connection ----------------------------------------------------------------------------

    def _open(self) -> grpc.aio.Channel:
        target = grpc_target(self.spec.endpoints)
        options = [("grpc.lb_policy_name", "round_robin"), ("grpc.enable_retries", 1),
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000),
                   ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 3_000),
                   ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        s = self.spec
        if s.cacert is None:
            return grpc.aio.insecure_channel(target, options=options)
        creds = grpc.ssl_channel_credentials(
            root_certificates=s.cacert.read_bytes(),
            private_key=s.key.read_bytes() if s.key else None,
            certificate_chain=s.cert.read_bytes() if s.cert else None)
        return grpc.aio.secure_channel(target, creds, options=options)

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = self._open()
        return self._channel

    async def _authenticate(self) -> None:
        if self.spec.user is None:
            return
        async with self._lock:
            password = await asyncio.to_thread(self.spec.password)
            try:
                resp = await rpc.AuthStub(self.channel).Authenticate(
                    rpc.AuthenticateRequest(name=self.spec.user, password=password or ""), timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                raise self._error(exc) from None
            self._metadata = (("token", resp.token),)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _error(self, exc: grpc.aio.AioRpcError) -> Exception:
        details = exc.details() or exc.code().name
        if exc.code() in _UNAVAILABLE:
            return StoreUnavailable(f"{self.where}: unavailable ({details})")
        if exc.code() == grpc.StatusCode.OUT_OF_RANGE or "compacted" in details:
            return Compacted(0)
        return StoreUnavailable(f"{self.where}: {exc.code().name.lower()} ({details})")

    async def _call(self, stub: type, method: str, request: object) -> object:
        if self.spec.user is not None and self._metadata is None:
            await self._authenticate()
        for attempt in (1, 2):
            try:
                fn = getattr(stub(self.channel), method)
                return await fn(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED and self.spec.user is not None and attempt == 1:
                    await self._authenticate()  # the auth token expired
                    continue
                raise self._error(exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    # -- key-value -----------------------------------------------------------------------------

    async def get(self, key: bytes) -> KeyValue | None:
        resp = await self._call(rpc.KVStub, "Range", rpc.RangeRequest(key=key))
        kvs = resp.kvs  # type: ignore[attr-defined]
        return _kv(kvs[0]) if kvs else None

    async def list(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` and the store revision of that (linearizable) read."""
        resp = await self._call(rpc.KVStub, "Range", rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix)))
        return resp.header.revision, [_kv(kv) for kv in resp.kvs]  # type: ignore[attr-defined]

    async def keys(self, prefix: bytes) -> list[bytes]:
        """The keys under ``prefix``, sorted (no values)."""
        resp = await self._call(rpc.KVStub, "Range", rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix),
                                                                      keys_only=True))
        return [kv.key for kv in resp.kvs]  # type: ignore[attr-defined]

    async def count(self, prefix: bytes) -> int:
        """How many keys are under ``prefix``."""
        resp = await self._call(rpc.KVStub, "Range", rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix),
                                                                      count_only=True))
        return int(resp.count)  # type: ignore[attr-defined]

    async def first_created(self, prefix: bytes, limit: int) -> list[bytes]:
        """The ``limit`` keys under ``prefix`` created first (no values)."""
        resp = await self._call(rpc.KVStub, "Range", rpc.RangeRequest(
            key=prefix, range_end=prefix_end(prefix), keys_only=True, limit=max(1, limit),
            sort_target=rpc.RangeRequest.CREATE, sort_order=rpc.RangeRequest.ASCEND))
        return [kv.key for kv in resp.kvs]  # type: ignore[attr-defined]

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        resp = await self._call(rpc.KVStub, "Put", rpc.PutRequest(key=key, value=value, lease=lease))
        return int(resp.header.revision)  # type: ignore[attr-defined]

    async def delete(self, key: bytes) -> None:
        await self._call(rpc.KVStub, "DeleteRange", rpc.DeleteRangeRequest(key=key))

    async def swap(self, key: bytes, value: bytes, mod_revision: int, lease: int = 0,
                   also: tuple[tuple[bytes, bytes], ...] = ()) -> tuple[bool, int]:
        """Put ``value`` (and the ``also`` pairs, in the same transaction) if the key's mod revision
        is ``mod_revision`` (0: the key does not exist). Returns (done, revision): the new
        revision, or the key's current mod revision."""
        compare = rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=key, mod_revision=mod_revision)
        puts = [rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))]
        puts += [rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=v)) for k, v in also]
        req = rpc.TxnRequest(
            compare=[compare],
            success=puts,
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))])
        resp = await self._call(rpc.KVStub, "Txn", req)
        if resp.succeeded:  # type: ignore[attr-defined]
            return True, int(resp.header.revision)  # type: ignore[attr-defined]
        kvs = resp.responses[0].response_range.kvs  # type: ignore[attr-defined]
        return False, int(kvs[0].mod_revision) if kvs else 0

    async def put_claiming(self, claim: bytes, owner: bytes, puts: tuple[tuple[bytes, bytes], ...],
                           lease: int, release: bytes | None = None,
                           deletes: tuple[bytes, ...] = ()) -> tuple[bool, int, bytes | None]:
        """In one transaction, if the key ``claim`` is absent or holds ``owner``: put ``claim`` =
        ``owner`` and the ``puts``, all on ``lease``, delete the ``deletes``, and delete the key
        ``release`` if it holds ``owner`` (a claim given up). Returns (done, revision, holder): the
        new revision, or (False, 0, the value ``claim`` holds: another owner's)."""
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=v, lease=lease)) for k, v in ((claim, owner), *puts)]
        ops += [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k)) for k in deletes]
        if release is not None and release != claim:
            ops.append(rpc.RequestOp(request_txn=rpc.TxnRequest(
                compare=[rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE, key=release, value=owner)],
                success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=release))])))
        absent = rpc.TxnRequest(
            compare=[rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=claim, create_revision=0)],
            success=ops,
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=claim))])
        req = rpc.TxnRequest(
            compare=[rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE, key=claim, value=owner)],
            success=ops,
            failure=[rpc.RequestOp(request_txn=absent)])
        resp = await self._call(rpc.KVStub, "Txn", req)
        revision = int(resp.header.revision)  # type: ignore[attr-defined]
        if resp.succeeded:  # type: ignore[attr-defined]
            return True, revision, None
        inner = resp.responses[0].response_txn  # type: ignore[attr-defined]
        if inner.succeeded:
            return True, revision, None
        kvs = inner.responses[0].response_range.kvs
        return False, 0, kvs[0].value if kvs else None

    async def create(self, key: bytes, value: bytes) -> bytes:
        """Put ``value`` unless the key exists; returns the value the key holds afterwards (the
        first writer's)."""
        done, _ = await self.swap(key, value, 0)
        if done:
            return value
        kv = await self.get(key)
        if kv is None:  # deleted meanwhile: try again
            return await self.create(key, value)
        return kv.value

    # -- leases --------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        resp = await self._call(rpc.LeaseStub, "LeaseGrant", rpc.LeaseGrantRequest(TTL=max(1, int(ttl))))
        return int(resp.ID)  # type: ignore[attr-defined]

    async def keepalive(self, lease: int) -> int:
        """Refresh ``lease``; returns its TTL (0: the lease is gone)."""
        if self.spec.user is not None and self._metadata is None:
            await self._authenticate()
        call = rpc.LeaseStub(self.channel).LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=lease)]),
                                                           timeout=self.timeout, metadata=self._metadata)
        try:
            async for reply in call:
                return int(reply.TTL)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        raise StoreUnavailable(f"{self.where}: lease keep-alive got no answer")

    async def time_to_live(self, lease: int) -> int:
        """The seconds ``lease`` has left (-1: it is gone). A read: no raft write."""
        resp = await self._call(rpc.LeaseStub, "LeaseTimeToLive", rpc.LeaseTimeToLiveRequest(ID=lease))
        return int(resp.TTL)  # type: ignore[attr-defined]

    async def revoke(self, lease: int) -> None:
        try:
            await self._call(rpc.LeaseStub, "LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease))
        except StoreUnavailable as exc:
            if "not found" not in str(exc):
                raise

    # -- watch ---------------------------------------------------------------------------------

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[Event]]:
        """Batches of events under ``prefix`` from ``start_revision`` on. Raises Compacted when
        that revision is gone, StoreUnavailable when the stream breaks."""
        if self.spec.user is not None and self._metadata is None:
            await self._authenticate()
        create = rpc.WatchCreateRequest(key=prefix, range_end=prefix_end(prefix), start_revision=start_revision,
                                        progress_notify=True)
        requests: asyncio.Queue[rpc.WatchRequest | None] = asyncio.Queue()
        requests.put_nowait(rpc.WatchRequest(create_request=create))

        async def outgoing() -> AsyncIterator[rpc.WatchRequest]:
            while (req := await requests.get()) is not None:
                yield req

        # "hasleader": the member cancels the watch when it loses its leader (a partitioned
        # member would otherwise keep a watch open that never sees another event).
        metadata = (self._metadata or ()) + (("hasleader", "true"),)
        call = rpc.WatchStub(self.channel).Watch(outgoing(), metadata=metadata)
        try:
            async for resp in call:
                if resp.compact_revision:
                    raise Compacted(resp.compact_revision)
                if resp.canceled:
                    raise StoreUnavailable(f"{self.where}: watch canceled ({resp.cancel_reason or 'no reason'})")
                if resp.events:
                    yield [Event(e.type == rpc.Event.DELETE, _kv(e.kv)) for e in resp.events]
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            requests.put_nowait(None)
            call.cancel()
        raise StoreUnavailable(f"{self.where}: watch stream ended")
