"""Choosing the credential source: ``CREDENTIAL_FETCHER_TYPE`` or ``auto`` detection.

``auto``: DMI strings first (``sys_vendor``, ``product_name``, ...; the directory is
``VMAGENT_DMI_ROOT``), then short probes of only the metadata servers the user named
explicitly (``GCE_METADATA_HOST``, ``AWS_EC2_METADATA_SERVICE_ENDPOINT``,
``VMAGENT_AZURE_METADATA_ENDPOINT``), then the token file.  A machine whose DMI names no
cloud never sends a packet to 169.254.169.254: on-premises that address leaves the host
(default route) and each probe costs up to ``PROBE_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

from vmagent.config import Config
from vmagent.identity.providers import (
    AZURE_INSTANCE_API,
    GCE_HEADERS,
    AwsProvider,
    AzureProvider,
    CredentialProvider,
    GceProvider,
    MetadataHttp,
    TokenFileProvider,
    aws_endpoint,
)
from vmagent.identity.tokens import AWS, AZURE, GCE, JWT, CredentialError

log = logging.getLogger(__name__)

DMI_FILES = (
    "sys_vendor",
    "product_name",
    "product_version",
    "bios_vendor",
    "bios_version",
    "chassis_asset_tag",
)
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
PROBE_TIMEOUT = 0.5  # seconds per probe

_NAMES = {"jwt": JWT, "": JWT, "googlecomputeengine": GCE, "aws": AWS, "azure": AZURE}


@dataclasses.dataclass(frozen=True)
class Detection:
    source: str
    reason: str


def configured_source(value: str) -> str | None:
    """The source ``CREDENTIAL_FETCHER_TYPE`` names, None for ``auto``; error if unknown."""
    key = value.strip().lower()
    if key == "auto":
        return None
    if key in _NAMES:
        return _NAMES[key]
    raise CredentialError(
        f"CREDENTIAL_FETCHER_TYPE={value!r}: expected auto, JWT, GoogleComputeEngine, AWS or Azure"
    )


def detect_from_dmi(dmi: Mapping[str, str]) -> Detection | None:
    """Recognise a cloud from DMI strings (file name -> trimmed content).

    The same strings cloud-init's ds-identify and the clouds' own guest agents check: GCE
    ``Google`` in sys_vendor/product_name; AWS ``Amazon EC2`` sys_vendor or ``Amazon``
    BIOS (Xen instances: ``4.x.amazon`` bios_version); Azure ``Microsoft Corporation``
    with chassis asset tag ``7783-7084-3265-9085-8269-3286-77``.  A Hyper-V VM on a desk
    also says ``Microsoft Corporation`` / ``Virtual Machine``: without the tag it is not Azure.
    """
    vendor = dmi.get("sys_vendor", "")
    product = dmi.get("product_name", "")
    if "Google" in vendor or "Google" in product:
        return Detection(GCE, f"DMI sys_vendor={vendor!r} product_name={product!r}")
    amazon = [
        k
        for k in ("sys_vendor", "bios_vendor", "product_version", "bios_version")
        if "amazon" in dmi.get(k, "").lower()
    ]
    if amazon:
        return Detection(AWS, f"DMI {amazon[0]}={dmi[amazon[0]]!r}")
    if dmi.get("chassis_asset_tag") == AZURE_ASSET_TAG:
        return Detection(AZURE, f"DMI sys_vendor={vendor!r}, chassis_asset_tag is Azure's")
    return None


def explicit_endpoints(config: Config) -> tuple[str, ...]:
    """Sources whose metadata endpoint the user set (not the link-local default), in probe order.

    Only these are probed when DMI names no cloud (a test or a proxy in front of IMDS).
    """
    keys = (
        (GCE, "GCE_METADATA_HOST"),
        (AWS, "AWS_EC2_METADATA_SERVICE_ENDPOINT"),
        (AZURE, "VMAGENT_AZURE_METADATA_ENDPOINT"),
    )
    return tuple(src for src, key in keys if config.sources.get(key, "default") != "default")


def read_dmi(root: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in DMI_FILES:
        try:
            found[name] = (Path(root) / name).read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            continue
    return found


def _prober() -> MetadataHttp:
    """Probes are single, short requests: no retries (a missing cloud must not slow start)."""
    return MetadataHttp(retries=0, timeout=PROBE_TIMEOUT)


async def _probe_gce(config: Config) -> bool:
    url = GceProvider(config).url.split("/computeMetadata/")[0] + "/computeMetadata/v1/"
    reply = await _prober().request("GET", url, GCE_HEADERS)
    return reply.status == 200 and reply.headers.get("metadata-flavor") == "Google"


async def _probe_aws(config: Config) -> bool:
    url = f"{aws_endpoint(config)}/latest/api/token"
    headers = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    return (await _prober().request("PUT", url, headers)).status == 200


async def _probe_azure(config: Config) -> bool:
    url = f"{AzureProvider(config).endpoint}/metadata/instance?api-version={AZURE_INSTANCE_API}"
    reply = await _prober().request("GET", url, {"Metadata": "true"})
    return reply.status == 200 and b'"compute"' in reply.body


async def _probe(source: str, config: Config) -> bool:
    probe = {GCE: _probe_gce, AWS: _probe_aws, AZURE: _probe_azure}[source]
    try:
        return await probe(config)
    except CredentialError as exc:
        log.debug("%s metadata probe: %s", source, exc)
        return False


async def detect(config: Config) -> Detection:
    """Which source to use and why (``auto``: DMI, then probes of explicit endpoints only)."""
    chosen = configured_source(config.credential_fetcher_type)
    if chosen is not None:
        return Detection(chosen, f"CREDENTIAL_FETCHER_TYPE={config.credential_fetcher_type!r}")
    by_dmi = detect_from_dmi(read_dmi(config.vmagent_dmi_root))
    if by_dmi is not None:
        return by_dmi
    order = explicit_endpoints(config)
    if not order:
        return Detection(JWT, "DMI names no cloud (nothing probed); using the token file")
    answers = await asyncio.gather(*(_probe(source, config) for source in order))
    for source, answered in zip(order, answers):
        if answered:
            return Detection(source, f"{source} metadata server answered a probe")
    return Detection(JWT, "no cloud found by DMI or metadata probes; using the token file")


def provider_for(source: str, config: Config) -> CredentialProvider:
    if source == GCE:
        return GceProvider(config)
    if source == AWS:
        return AwsProvider(config)
    if source == AZURE:
        return AzureProvider(config)
    return TokenFileProvider(config.vmagent_token_file)


async def choose_provider(config: Config) -> tuple[CredentialProvider, Detection]:
    detection = await detect(config)
    log.info("credential source: %s (%s)", detection.source, detection.reason)
    return provider_for(detection.source, config), detection
