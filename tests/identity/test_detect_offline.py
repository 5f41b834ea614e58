"""``CREDENTIAL_FETCHER_TYPE=auto`` on a machine whose DMI names no cloud: no metadata probe.

The detection runs in a child interpreter with a ``socket.connect`` audit hook, so any
connection attempt (to 169.254.169.254 or anywhere) is seen, whatever library makes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .emulators import CloudKeys, GceEmulator

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def keys() -> CloudKeys:
    return CloudKeys()


CHILD = r"""
import asyncio, json, sys, time
from pathlib import Path
from vmagent.config import load_config
connects = []
def hook(event, args):
    if event == "socket.connect":
        connects.append(repr(args[1]))
sys.addaudithook(hook)
from vmagent.identity.detect import detect
overrides = json.loads(sys.argv[1])
env = Path(sys.argv[2])
env.write_text("")
config = load_config({}, overrides=overrides, cluster_env=env)
start = time.monotonic()
found = asyncio.run(detect(config))
print(json.dumps({"source": found.source, "reason": found.reason, "connects": connects,
                  "seconds": time.monotonic() - start}))
"""


def run_detect(tmp_path: Path, **overrides: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(overrides), str(tmp_path / "cluster.env")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def dmi_dir(tmp_path: Path, **strings: str) -> str:
    folder = tmp_path / "dmi"
    folder.mkdir()
    for name, value in strings.items():
        (folder / name).write_text(value + "\n")
    return str(folder)


@pytest.mark.parametrize(
    "dmi",
    [
        {"sys_vendor": "QEMU", "product_name": "Standard PC (Q35 + ICH9, 2009)"},
        # Hyper-V on a desk: Microsoft, but no Azure asset tag.
        {"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine"},
        {},
    ],
)
def test_no_cloud_in_dmi_means_no_connection_at_all(tmp_path: Path, dmi: dict[str, str]) -> None:
    found = run_detect(tmp_path, VMAGENT_DMI_ROOT=dmi_dir(tmp_path, **dmi))
    assert found["source"] == "JWT", found
    assert found["connects"] == [], f"auto detection connected to {found['connects']}"
    assert "token file" in str(found["reason"])


def test_explicit_metadata_host_is_still_probed(tmp_path: Path, keys: CloudKeys) -> None:
    with GceEmulator(keys) as gce:
        found = run_detect(
            tmp_path,
            VMAGENT_DMI_ROOT=dmi_dir(tmp_path, sys_vendor="QEMU"),
            GCE_METADATA_HOST=f"127.0.0.1:{gce.port}",
        )
        assert found["source"] == "GoogleComputeEngine", found
        assert len(gce.requests) == 1
    # Only the named server was contacted: the AWS/Azure defaults (169.254.169.254) were not.
    assert all("127.0.0.1" in c for c in found["connects"]), found  # type: ignore[union-attr]


def test_unset_metadata_host_leaves_a_local_emulator_untouched(
    tmp_path: Path, keys: CloudKeys
) -> None:
    with GceEmulator(keys) as gce:
        found = run_detect(tmp_path, VMAGENT_DMI_ROOT=dmi_dir(tmp_path, sys_vendor="QEMU"))
        assert gce.requests == []
    assert found["source"] == "JWT" and found["connects"] == []
