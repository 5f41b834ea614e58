"""The control-plane link: one ADS stream to istiod (or devmesh) carrying NDS and health."""

from vmagent.health import HealthEvent as Health
from vmagent.xds.client import ChannelAuth, XdsClient, xds_target
from vmagent.xds.node import NodeError, NodeInfo, build_node, usable_ips
from vmagent.xds.session import HEALTH_TYPE, NAME_TABLE_TYPE, name_table_document

__all__ = [
    "HEALTH_TYPE",
    "NAME_TABLE_TYPE",
    "ChannelAuth",
    "Health",
    "NodeError",
    "NodeInfo",
    "XdsClient",
    "build_node",
    "name_table_document",
    "usable_ips",
    "xds_target",
]
