"""The control-plane link: one ADS stream to istiod (or devmesh) carrying NDS, health and,
through the xDS proxy, Envoy's ADS."""

from vmagent.health import HealthEvent as Health
from vmagent.xds.client import XdsClient
from vmagent.xds.clienttypes import ChannelAuth, upstream_kind, xds_target
from vmagent.xds.node import NodeError, NodeInfo, build_node, usable_ips
from vmagent.xds.proxy import XdsProxy, xds_socket_path
from vmagent.xds.session import HEALTH_TYPE, NAME_TABLE_TYPE, name_table_document

__all__ = [
    "HEALTH_TYPE",
    "NAME_TABLE_TYPE",
    "ChannelAuth",
    "Health",
    "NodeError",
    "NodeInfo",
    "XdsClient",
    "XdsProxy",
    "build_node",
    "name_table_document",
    "upstream_kind",
    "usable_ips",
    "xds_socket_path",
    "xds_target",
]
