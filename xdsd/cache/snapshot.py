"""A consistent, versioned set of resources for one node group."""

from __future__ import annotations

import operator
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf.message import Message

from xdsd import typeurls
from xdsd.cache.inputs import Encoded, Patched
from xdsd.cache.resources import Resource, TypeSnapshot


class InconsistentSnapshot(ValueError):
    """The generated resources reference each other wrongly: a bug in a generator, never sent."""


def _resource_name(message: Message | Encoded) -> str:
    if isinstance(message, cluster_pb2.Cluster | listener_pb2.Listener | Encoded):
        return message.name
    name = getattr(message, "cluster_name", None) or getattr(message, "name", None)
    if not name:
        raise InconsistentSnapshot(f"{type(message).__name__} without a name")
    return str(name)


def _rds_names(listener: listener_pb2.Listener) -> set[str]:
    names: set[str] = set()
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for f in chain.filters:
            if f.typed_config.type_url.endswith("HttpConnectionManager"):
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                if hcm.HasField("rds"):
                    names.add(hcm.rds.route_config_name)
    return names


class Encoder:
    """Serializes each generated message once. Generators hand back the same message object while
    its inputs are unchanged (generators.memo), so a message seen before, in any group or an
    earlier revision, reuses its Resource. Entries live for the revision that used them and the next."""

    def __init__(self) -> None:
        self._previous: dict[int, tuple[Message, Resource, frozenset[str]]] = {}
        self._current: dict[int, tuple[Message, Resource, frozenset[str]]] = {}

    def _entry(self, message: Message) -> tuple[Message, Resource, frozenset[str]]:
        key = id(message)
        entry = self._current.get(key) or self._previous.get(key)
        if entry is None or entry[0] is not message:
            rds = frozenset(_rds_names(message)) if isinstance(message, listener_pb2.Listener) else frozenset()
            if isinstance(message, Encoded):  # already serialized by the generator
                resource = Resource.from_body(message.name, message.type_url, message.body, message.version)
            else:
                resource = Resource.from_message(_resource_name(message), message)
            entry = (message, resource, rds)
        self._current[key] = entry  # holds the message, so its id is not reused while the entry lives
        return entry

    def resource(self, message: Message) -> Resource:
        return self._entry(message)[1]

    def rds_names(self, listener: Message) -> frozenset[str]:
        return self._entry(listener)[2]

    def sweep(self) -> None:
        self._previous, self._current = self._current, {}


@dataclass(frozen=True, slots=True)
class Snapshot:
    group: Hashable  # the key it was built for (a node group)
    revision: int
    types: dict[str, TypeSnapshot]
    created: float = field(default_factory=time.monotonic)
    # The generated messages each type was built from (identity tells the next build what changed).
    sources: dict[str, list[Message]] = field(default_factory=dict, repr=False, compare=False)
    # The generator's own lists (not copies): a Patched list names the one it patched.
    origins: dict[str, list[Message]] = field(default_factory=dict, repr=False, compare=False)

    def get(self, type_url: str) -> TypeSnapshot:
        ts = self.types.get(type_url)
        return ts if ts is not None else TypeSnapshot.empty(type_url)

    @classmethod
    def build(cls, group: Hashable, revision: int, generated: dict[str, list[Message]],
              encoder: Encoder | None = None, previous: Snapshot | None = None) -> Snapshot:
        """Serialize every resource once and check that references resolve (DESIGN: cache).

        Against the group's ``previous`` snapshot, work is proportional to what changed: a type
        whose generated messages are the very same objects keeps its TypeSnapshot; one where a few
        positions changed is patched; reference checks run only when the types involved changed."""
        enc = encoder if encoder is not None else Encoder()
        old_sources = previous.sources if previous is not None else {}
        origins = previous.origins if previous is not None else {}
        if (
            previous is not None
            and generated.keys() == origins.keys()
            and all(msgs is origins[t] for t, msgs in generated.items())
        ):
            return previous  # the generator handed back its very lists: nothing changed
        same = {
            t for t, msgs in generated.items()
            if (old := old_sources.get(t)) is not None and len(old) == len(msgs)
            and (msgs is origins.get(t) or all(map(operator.is_, msgs, old)))
        }
        # Positions that changed, where the generator says so (a Patched list of the previous one).
        hinted: dict[str, list[int]] = {
            t: msgs.changed for t, msgs in generated.items()
            if t not in same and isinstance(msgs, Patched) and msgs.base is origins.get(t)
            and len(msgs) == len(old_sources[t])
        }
        if typeurls.CLUSTER in same and previous is not None:
            eds_names = previous.get(typeurls.CLUSTER).eds_names
        elif typeurls.CLUSTER in hinted and previous is not None:
            eds_names = _patched_eds_names(previous.get(typeurls.CLUSTER).eds_names, old_sources[typeurls.CLUSTER],
                                           generated[typeurls.CLUSTER], hinted[typeurls.CLUSTER])
        else:
            eds_names = frozenset(
                c.name
                for c in generated.get(typeurls.CLUSTER, [])
                if isinstance(c, cluster_pb2.Cluster) and c.type == cluster_pb2.Cluster.EDS
            )
        types: dict[str, TypeSnapshot] = {}
        renamed: set[str] = set()  # patched types where a changed position holds another name
        for type_url, messages in generated.items():
            names = eds_names if type_url == typeurls.CLUSTER else frozenset()
            prev_ts = previous.types.get(type_url) if previous is not None else None
            old = old_sources.get(type_url)
            if type_url in same and prev_ts is not None:
                types[type_url] = prev_ts if _same_names(prev_ts.eds_names, names) else prev_ts.patch((), (), names)
            elif prev_ts is not None and old is not None and len(old) == len(messages):
                changed = hinted.get(type_url)
                if changed is None:
                    changed = [i for i, (a, b) in enumerate(zip(messages, old, strict=True)) if a is not b]
                    renamed.add(type_url)
                gone = [_resource_name(old[i]) for i in changed]
                added = [enc.resource(messages[i]) for i in changed]
                if [r.name for r in added] != gone:
                    renamed.add(type_url)
                types[type_url] = prev_ts.patch(
                    [r for n in gone if (r := prev_ts.resources.get(n)) is not None], added, names)
            else:
                renamed.add(type_url)
                types[type_url] = TypeSnapshot.build(type_url, [enc.resource(m) for m in messages], names, prev_ts)
        # Types whose names (and, for clusters, EDS names) are those of the previous snapshot, which
        # was consistent: the reference checks below need not look at them again.
        stable = {t for t in types if t not in renamed and previous is not None}
        if previous is None or not _same_names(eds_names, previous.get(typeurls.CLUSTER).eds_names):
            stable.discard(typeurls.CLUSTER)
        empty: Mapping[str, Resource] = {}
        if not {typeurls.CLUSTER, typeurls.ENDPOINT} <= stable:
            cla_names = types[typeurls.ENDPOINT].resources if typeurls.ENDPOINT in types else empty
            if missing := eds_names - cla_names.keys():
                raise InconsistentSnapshot(f"EDS clusters without a ClusterLoadAssignment: {sorted(missing)}")
        if not (typeurls.LISTENER in same and typeurls.ROUTE in stable):
            route_names = (types[typeurls.ROUTE].resources if typeurls.ROUTE in types else empty).keys()
            for listener in generated.get(typeurls.LISTENER, []):
                assert isinstance(listener, listener_pb2.Listener)
                if missing := enc.rds_names(listener) - route_names:
                    raise InconsistentSnapshot(f"listener {listener.name!r} references unknown routes {sorted(missing)}")
        sources = {t: old_sources[t] if m is origins.get(t) else list(m) for t, m in generated.items()}
        return cls(group, revision, types, sources=sources, origins=dict(generated))

    def changed_types(self, previous: Snapshot | None) -> set[str]:
        if previous is self:
            return set()
        if previous is None:
            return set(self.types)
        urls = set(self.types) | set(previous.types)
        return {t for t in urls if self.get(t).version != previous.get(t).version}


def _same_names(a: frozenset[str], b: frozenset[str]) -> bool:
    return a is b or a == b  # set equality does not short-cut on identity


def _patched_eds_names(previous: frozenset[str], old: list[Message], new: list[Message], changed: list[int]) -> frozenset[str]:
    """The EDS cluster names after the clusters at ``changed`` positions were replaced."""
    def eds(c: Message) -> bool:
        return isinstance(c, cluster_pb2.Cluster) and c.type == cluster_pb2.Cluster.EDS

    gone = {_resource_name(old[i]) for i in changed if eds(old[i])}
    came = {_resource_name(new[i]) for i in changed if eds(new[i])}
    if not gone and not came:
        return previous
    return (previous - gone) | came
