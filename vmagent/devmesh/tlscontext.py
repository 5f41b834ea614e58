"""Istio's mutual TLS between sidecars, as Envoy transport sockets (JSON-ready dicts that
:func:`google.protobuf.json_format.ParseDict` turns into Envoy v3 protos).

Both ends take their certificates from the agent's SDS server (bootstrap cluster ``sds-grpc``):
``default`` (certificate chain + key) and ``ROOTCA`` (the trust root), as Istio's
``pilot/pkg/networking/util`` and ``security/pkg/nodeagent`` name them.

- Client (outbound clusters): ALPN ``istio-peer-exchange``, ``istio`` (``ALPNInMeshWithMxc``),
  SNI ``outbound_.<port>_._.<host>`` (``model.BuildDNSSrvSubsetKey``), selected per endpoint by
  ``transport_socket_matches`` on the endpoint metadata ``tlsMode: istio``, as istiod does for
  endpoints with the ``security.istio.io/tlsMode`` label.
- Server (inbound filter chains): ALPN ``istio-peer-exchange``, ``h2``, ``http/1.1``
  (``ALPNDownstreamWithMxc``), a client certificate required (STRICT mTLS); the filter chain
  matches the ALPNs Istio clients offer (``allIstioMtlsALPNs`` in ``core/listener.go``).
"""

from __future__ import annotations

from typing import Any

SDS_CLUSTER = "sds-grpc"
CERT_SECRET = "default"
ROOT_SECRET = "ROOTCA"
UPSTREAM_ALPN = ("istio-peer-exchange", "istio")
DOWNSTREAM_ALPN = ("istio-peer-exchange", "h2", "http/1.1")
MTLS_ALPNS = ("istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2")
TLS_MODE_LABEL = "security.istio.io/tlsMode"
TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"

_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
_RAW = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"


def sni(port: int, host: str) -> str:
    """The SNI an Istio client sends to ``host:port`` (no subset)."""
    return f"outbound_.{port}_._.{host}"


def _sds(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}],
            },
            "initial_fetch_timeout": "0s",
            "resource_api_version": "V3",
        },
    }


def _common(alpn: tuple[str, ...]) -> dict[str, Any]:
    return {
        "alpn_protocols": list(alpn),
        "tls_certificate_sds_secret_configs": [_sds(CERT_SECRET)],
        "combined_validation_context": {
            "default_validation_context": {},
            "validation_context_sds_secret_config": _sds(ROOT_SECRET),
        },
    }


def upstream_mtls(port: int, host: str) -> dict[str, Any]:
    """The client side of Istio mTLS to ``host:port`` (a ``TransportSocket``)."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{_TLS}.UpstreamTlsContext",
            "common_tls_context": _common(UPSTREAM_ALPN),
            "sni": sni(port, host),
        },
    }


def downstream_mtls() -> dict[str, Any]:
    """The server side of Istio mTLS (a ``TransportSocket``), client certificate required."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{_TLS}.DownstreamTlsContext",
            "common_tls_context": _common(DOWNSTREAM_ALPN),
            "require_client_certificate": True,
        },
    }


def raw_buffer() -> dict[str, Any]:
    return {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {"@type": _RAW}}


def socket_matches(port: int, host: str) -> list[dict[str, Any]]:
    """Istio's ``transport_socket_matches``: mTLS to mesh endpoints, plaintext to the rest."""
    return [
        {
            "name": "tlsMode-istio",
            "match": {"tlsMode": "istio"},
            "transport_socket": upstream_mtls(port, host),
        },
        {"name": "tlsMode-disabled", "match": {}, "transport_socket": raw_buffer()},
    ]


def mesh_endpoint_metadata() -> dict[str, Any]:
    """Endpoint metadata that selects the ``tlsMode-istio`` socket match."""
    return {"filter_metadata": {TRANSPORT_SOCKET_MATCH: {"tlsMode": "istio"}}}
