"""Assembly: every resource a node of a group should hold, from the mesh (which node gets what is
decided here), using the reuse rules (``reuse``) and, after a registration, the patch (``patch``)."""

from __future__ import annotations

from google.protobuf.message import Message

from xdsd import typeurls
from xdsd.ca import Credentials, gateway_id, service_id
from xdsd.generators import authn, clusters, listeners, routes, secrets, telemetry
from xdsd.generators.memo import Memo, NoMemo
from xdsd.generators.patch import Generated, Layout, patch
from xdsd.generators.reuse import (
    each,
    policies_of,
    policy_of,
    service_cluster_of,
    service_endpoints,
    targets_of,
)
from xdsd.generators.roles import GATEWAY, SIDECAR, role_of
from xdsd.model import Mesh, Service
from xdsd.node import NodeGroup

_NO_CREDENTIALS = Credentials()
_NO_MEMO = NoMemo()


def required_identities(mesh: Mesh) -> set[str]:
    """Every SPIFFE ID the CA must hold an SVID for: services with sidecars, and gateways that call
    them over mTLS."""
    td = mesh.mesh.trust_domain
    ids = {service_id(td, name) for name, svc in mesh.services.items() if svc.sidecar is not None}
    for name, gw in mesh.gateways.items():
        if any(mesh.services[s].sidecar is not None for r in gw.routes for s, _ in r.destinations()):
            ids.add(gateway_id(td, name))
    return ids


def generate(mesh: Mesh, group: NodeGroup, credentials: Credentials = _NO_CREDENTIALS,
             memo: Memo = _NO_MEMO) -> dict[str, list[Message]]:
    """Every resource a node of ``group`` should hold, by type URL. With a ``memo``, per-service
    resources are built once per revision for all groups, and kept while their service is unchanged.

    When the memo says that only some services' endpoints changed since the mesh of its last
    output for ``group`` (``memo.endpoints_changed``), that output is patched: the assignments
    (and STRICT_DNS clusters) of those services are rebuilt, the rest is the same list objects.
    The result equals a full generation (tested); the work is O(changed services), not O(clusters)."""
    key = ("generated", group)
    change = memo.endpoints_changed
    if change is not None:
        last = memo.last(key)
        if isinstance(last, Generated) and last.mesh is change[0] and last.credentials is credentials:
            patched = patch(mesh, group, last, change[1], memo)
            if patched is not None:
                memo.keep(key, patched)
                return patched.out
    out: dict[str, list[Message]] = {t: [] for t in typeurls.PUSH_ORDER}
    role = role_of(mesh, group.cluster)
    layout: Layout = (0, [], None)
    if role == GATEWAY:
        layout = _gateway(mesh, group, credentials, out, memo)
    elif role == SIDECAR and mesh.services[group.cluster].sidecar is not None:
        layout = _sidecar(mesh, group, credentials, out, memo)
    telemetry.extend(mesh, group, out, memo)  # stats listener, access logs, tracing (mesh.telemetry)
    memo.keep(key, Generated(mesh, credentials, out, *layout))
    return out


def _gateway(mesh: Mesh, group: NodeGroup, credentials: Credentials, out: dict[str, list[Message]], memo: Memo) -> Layout:
    gateway = mesh.gateways[group.cluster]
    targets = memo.get(("gw-targets", group.cluster), (gateway,), lambda: targets_of(mesh, list(gateway.routes)))
    # The gateway has an identity when it calls a service with sidecars (as in required_identities).
    own_id: str | None = gateway_id(mesh.mesh.trust_domain, group.cluster)
    if not any(mesh.services[s].sidecar is not None for s, _ in targets):
        own_id = None
    services = [mesh.services[name] for name, _ in targets]
    out[typeurls.CLUSTER] = each(mesh, memo, ("cds-of", group, own_id), targets,
                                  lambda t: service_cluster_of(mesh, t, group, own_id, memo), services)
    out[typeurls.ENDPOINT] = service_endpoints(mesh, targets, group.zone, memo, key=group.cluster, services=services)
    # Listener and routes depend on the gateway and the policies of the services it routes to.
    distinct = memo.get(("gw-services", group.cluster), (gateway,),
                        lambda: [(s, None) for s in sorted({s for s, _ in targets})])
    policies = policies_of(mesh, distinct, memo, key=group.cluster)
    # A gateway with a policy asks ext_authz (sending the headers its rules match on).
    policy = mesh.authorization.get(group.cluster)
    authz = None if policy is None else listeners.policy_headers(policy)
    # End users (mesh.authentication): JWT checks and a login before the authorization check.
    auth = mesh.authentication
    request_auth = listeners.uses_request_auth(policy)
    out[typeurls.LISTENER] = [memo.get(
        ("gw-lds", group, authz, request_auth), (gateway, auth, policy),
        lambda: listeners.gateway_listener(group.cluster, gateway, group, authz,
                                           tuple(authn.filters(mesh, group.cluster, group)), request_auth))]
    out[typeurls.ROUTE] = [memo.get(("gw-rds", group.cluster, authz is not None), (gateway, mesh.mesh),
                                    lambda: routes.gateway_routes(group.cluster, gateway, mesh), equal=policies)]
    key_clusters = memo.get(("gw-authn-cds", group.cluster), (gateway, auth), lambda: authn.clusters_of(mesh, group.cluster))
    if key_clusters:  # after the service clusters, whose positions the patch relies on
        out[typeurls.CLUSTER] = [*out[typeurls.CLUSTER], *key_clusters]
    gateway_secrets = memo.get(("gw-authn-sds", group.cluster), (gateway, auth),
                               lambda: authn.login_secrets(mesh, group.cluster))
    if own_id is not None or gateway_secrets:
        out[typeurls.SECRET] = [*(_secrets(credentials, own_id, memo) if own_id is not None else []), *gateway_secrets]
    return 0, targets, own_id


def _sidecar(mesh: Mesh, group: NodeGroup, credentials: Credentials, out: dict[str, list[Message]], memo: Memo) -> Layout:
    name = group.cluster
    service = mesh.services[name]
    sidecar = service.sidecar
    assert sidecar is not None
    td = mesh.mesh.trust_domain
    own_id = service_id(td, name)
    upstreams = sorted(sidecar.upstreams)
    app_cluster = f"inbound|{sidecar.app_port}|{name}"
    policy = mesh.authorization.get(name)
    local_cluster, own_listeners = memo.get(
        ("sidecar", group, own_id), (mesh.mesh, mesh.authentication, policy),
        lambda: _sidecar_own(name, service, group, own_id, td, app_cluster, upstreams,
                             listeners.policy_headers(policy), tuple(authn.filters(mesh, name, group)),
                             listeners.uses_request_auth(policy)),
        equal=(policy_of(mesh, name, memo), service.processing),
    )
    # Each upstream's clusters: the whole service and the subsets its own routes send to.
    targets = [t for u in upstreams for t in targets_of(mesh, mesh.services[u].routes, default_service=u)]
    out[typeurls.CLUSTER] = [local_cluster, *(service_cluster_of(mesh, t, group, own_id, memo) for t in targets)]
    out[typeurls.ENDPOINT] = service_endpoints(mesh, targets, group.zone, memo)
    out[typeurls.LISTENER] = list(own_listeners)
    out[typeurls.ROUTE] = [
        memo.get(("rds-out", u), (mesh.mesh,), lambda u=u: routes.outbound_routes(u, mesh),  # type: ignore[misc]
                 equal=policies_of(mesh, {u, *(s for s, _ in targets_of(mesh, mesh.services[u].routes, u))}, memo))
        for u in upstreams
    ]
    out[typeurls.CLUSTER].extend(memo.get(("sidecar-authn-cds", name), (mesh.authentication,),
                                          lambda: authn.clusters_of(mesh, name)))
    out[typeurls.SECRET] = _secrets(credentials, own_id, memo)
    return 1, targets, own_id  # after the local app cluster


def _sidecar_own(name: str, service: Service, group: NodeGroup, own_id: str, td: str, app_cluster: str,
                 upstreams: list[str], authz_headers: tuple[str, ...], authn_filters: tuple[Message, ...] = (),
                 request_auth: bool = False) -> tuple[Message, tuple[Message, ...]]:
    """What a sidecar holds for its own service: the local app cluster, its inbound listener and
    one outbound listener per upstream. Depends on its own service (and the group) only."""
    sidecar = service.sidecar
    assert sidecar is not None
    local = clusters.local_app_cluster(app_cluster, group.app_address or sidecar.app_address, sidecar.app_port, service.protocol)
    inbound_address = group.inbound_address or sidecar.inbound.address
    own_listeners = (
        listeners.inbound_listener(name, inbound_address, sidecar.inbound.port,
                                   routes.inbound_routes(name, app_cluster, service.processing), group, own_id, td, authz_headers,
                                   authn_filters, request_auth, processing=service.processing),  # type: ignore[arg-type]
        *(
            listeners.outbound_listener(u, sidecar.upstreams[u], routes.outbound_route_name(u), group)
            for u in upstreams
        ),
    )
    return local, own_listeners


def _secrets(credentials: Credentials, own_id: str, memo: Memo) -> list[Message]:
    svid = credentials.svids.get(own_id)
    return memo.get(("sds", own_id), (svid, credentials.bundle_pem), lambda: secrets.generate(credentials, own_id))
