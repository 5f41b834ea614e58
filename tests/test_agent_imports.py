"""`vmagent run` loads only what the agent uses (issue 7 §5: the agent's RSS, ~7 MB of it was
modules it never needed): no other command's modules, no ``requests`` unless a cloud metadata
provider is used, no Envoy modules with ``VMAGENT_ENVOY=false``."""

from __future__ import annotations

import subprocess
import sys

from vmagent.cli import _command_in

NOT_FOR_RUN = ["vmagent.devmesh", "requests", "urllib3", "vmagent.envoy", "psutil"]


def loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return set(out.split())


def test_the_run_command_line_registers_only_the_agent() -> None:
    assert _command_in(["run"]) == ("run",)
    assert _command_in(["--log-level", "debug", "--cluster-env", "x.env", "run"]) == ("run",)
    assert _command_in(["--log-level=debug", "dns", "serve"]) == ("dns",)
    assert _command_in(["--help"]) == () and _command_in(["nope"]) == ()  # all, as before
    assert _command_in(["run", "--help"]) == ("run",)  # its own help needs only itself
    assert _command_in(["config", "show"]) == () and _command_in([]) == ()
    modules = loaded_after("from vmagent.cli import build_parser; build_parser('run')")
    assert "vmagent.agent" in modules
    assert not [m for m in modules for gone in NOT_FOR_RUN if m.split(".")[:2] == gone.split(".")]


def test_an_agent_without_envoy_imports_no_envoy_modules() -> None:
    modules = loaded_after("import vmagent.agent, vmagent.identity")
    assert not {"vmagent.agent_envoy", "vmagent.envoy", "vmagent.identity.sds"} & modules
    assert "requests" not in modules  # until a metadata provider makes its first request
    with_sds = loaded_after("from vmagent.identity import SdsServer")
    assert "vmagent.identity.sds" in with_sds  # still there on first use
