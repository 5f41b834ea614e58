"""Everything the development control plane knows, without I/O: the mesh config, the
registry of WorkloadEntries and the connected xDS sessions, plus the views the debug endpoints
show. The asyncio shells (:mod:`~vmagent.devmesh.ads`, :mod:`~vmagent.devmesh.debug`,
:mod:`~vmagent.devmesh.controlplane`) mutate it from the one event loop."""

from __future__ import annotations

from typing import Any

from google.protobuf import any_pb2, json_format

from vmagent._proto import nds_pb2
from vmagent.devmesh.nametable import allocate_addresses, build_name_table
from vmagent.devmesh.node import ProxyNode
from vmagent.devmesh.registry import DEFAULT_GRACE, Registry, WorkloadEntry
from vmagent.devmesh.services import MeshConfig
from vmagent.devmesh.session import NAME_TABLE, Session


def pack_table(table: nds_pb2.NameTable) -> tuple[any_pb2.Any, bytes]:
    """The Any-packed resource and the deterministic bytes used to detect changes."""
    payload = table.SerializeToString(deterministic=True)
    return any_pb2.Any(type_url=NAME_TABLE, value=payload), payload


class MeshState:
    def __init__(
        self,
        config: MeshConfig | None = None,
        *,
        grace: float = DEFAULT_GRACE,
        auto_allocate: bool = True,
        controller: str = "devmesh",
    ) -> None:
        self.config = config or MeshConfig()
        self.allocated = allocate_addresses(self.config)
        self.config_error = ""
        self.config_generation = 0
        self.auto_allocate = auto_allocate
        self.registry = Registry(grace, controller)
        self.sessions: dict[str, Session] = {}

    def set_config(
        self, config: MeshConfig, now: float
    ) -> tuple[list[WorkloadEntry], list[WorkloadEntry], list[WorkloadEntry]]:
        """Install a new config; returns the entries deleted because their group went away,
        those registered again for connected proxies because their group came back, and those
        whose ports followed an edited group template."""
        self.config = config
        self.allocated = allocate_addresses(config)
        self.config_error = ""
        self.config_generation += 1
        deleted = self.registry.prune(config)
        refreshed = self.registry.refresh(config)
        return deleted, self.registry.reregister(config, now), refreshed

    def name_table(self, node: ProxyNode) -> nds_pb2.NameTable:
        return build_name_table(
            self.config,
            self.registry.entries(),
            node,
            auto_allocate=self.auto_allocate,
            allocated=self.allocated,
        )

    def find(self, proxy: str) -> list[Session]:
        """Sessions whose node ID, proxy name (``POD_NAME``), ``name.namespace`` part, first IP
        or stream ID equals ``proxy``; all sessions when ``proxy`` is empty."""
        found = []
        for session in self.sessions.values():
            node = session.node
            if node is None:
                continue
            ident = node.id.split("~")[2]
            keys = {node.id, node.name, ident, node.ips[0], session.id}
            if not proxy or proxy in keys:
                found.append(session)
        return found

    # --- debug views (JSON-ready) ---

    def registry_view(self) -> dict[str, Any]:
        return {
            "workloadEntries": [e.to_dict() for e in self.registry.entries()],
            "workloadGroups": [
                {"name": g.name, "namespace": g.namespace, "source": g.source}
                for g in self.config.groups
            ],
        }

    def connections_view(self) -> dict[str, Any]:
        connections = []
        for session in self.sessions.values():
            item = session.to_dict()
            entry = self.registry.entry_of(session.id)
            item["workloadEntry"] = f"{entry.namespace}/{entry.name}" if entry else None
            connections.append(item)
        return {"connections": connections}

    def ndsz_view(self, proxy: str) -> dict[str, Any]:
        out = []
        for session in self.find(proxy):
            assert session.node is not None
            table = self.name_table(session.node)
            watch = session.watches.get(NAME_TABLE)
            out.append(
                {
                    "proxy": session.node.id,
                    "stream": session.id,
                    "nameTable": json_format.MessageToDict(table),
                    "nds": watch.to_dict() if watch else None,
                }
            )
        return {"proxies": out}

    def config_view(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "files": list(cfg.files),
            "generation": self.config_generation,
            "error": self.config_error or None,
            "services": [
                {
                    "host": s.host,
                    "namespace": s.namespace,
                    "registry": s.registry,
                    "addresses": list(s.addresses),
                    "resolution": s.resolution,
                    "autoAllocated": self.allocated.get((s.namespace, s.host)),
                    "source": s.source,
                }
                for s in cfg.services
            ],
            "workloadGroups": [
                {"name": g.name, "namespace": g.namespace, "probe": g.probe, "source": g.source}
                for g in cfg.groups
            ],
            "sidecars": [
                {"namespace": s.namespace, "egress": list(s.egress)} for s in cfg.sidecars
            ],
        }
