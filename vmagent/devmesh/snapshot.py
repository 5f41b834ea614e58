"""Everything one proxy is served, per type URL: its NameTable (one unnamed resource) and its
Envoy data plane (:mod:`~vmagent.devmesh.dataplane`), computed from the mesh state. Pure."""

from __future__ import annotations

import hashlib
from collections.abc import Collection

from vmagent.devmesh.dataplane import DATAPLANE_TYPES, Resource, build_dataplane
from vmagent.devmesh.dataplane_model import DataplaneOptions
from vmagent.devmesh.session import NAME_TABLE, Session
from vmagent.devmesh.state import MeshState, pack_table

Snapshot = dict[str, dict[str, Resource]]  # type URL -> name -> resource


def name_table_resource(state: MeshState, session: Session) -> Resource:
    """The proxy's NameTable as an unnamed resource (istiod's ``NdsGenerator``), versioned by
    the hash of its deterministic bytes."""
    assert session.node is not None
    packed, payload = pack_table(state.name_table(session.node))
    return Resource("", hashlib.sha256(payload).hexdigest()[:16], packed)


def proxy_snapshot(
    state: MeshState, session: Session, options: DataplaneOptions, types: Collection[str]
) -> Snapshot:
    """``types`` (type URLs) for ``session``'s proxy (its node must be known). The data plane
    is built only when one of its types is asked for: an agent without Envoy watches only
    the NameTable."""
    assert session.node is not None
    out: Snapshot = {}
    if NAME_TABLE in types:
        out[NAME_TABLE] = {"": name_table_resource(state, session)}
    if not any(t in DATAPLANE_TYPES for t in types):
        return out
    out.update(
        build_dataplane(
            state.config,
            state.registry.entries(),
            session.node,
            state.registry.entry_of(session.id),
            options,
        )
    )
    return out


def served_types() -> tuple[str, ...]:
    """Type URLs with resources, in istiod's push order (CDS before EDS, LDS before RDS)."""
    return (*DATAPLANE_TYPES, NAME_TABLE)
