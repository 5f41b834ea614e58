"""How Envoy is spawned: it dies with the agent (PR_SET_PDEATHSIG, even when the agent is
killed with SIGKILL), and starting it prints nothing of gRPC's on the agent's stderr.

With a ``preexec_fn`` in a process where gRPC threads are busy, CPython runs the fork
handlers and gRPC logs "Other threads are currently calling into gRPC, skipping fork()
handlers" at every Envoy start (issue 7: no raw gRPC lines on stderr)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from vmagent.envoy.process import pdeathsig_argv

pytestmark = pytest.mark.timeout(60)

# An "agent": gRPC busy (an aio server and a channel trying to connect), then three spawns
# of a long sleep the way the supervisor spawns Envoy; prints the last child's pid.
AGENT = textwrap.dedent(
    """
    import asyncio
    import vmagent
    import grpc.aio
    from vmagent.envoy.process import spawn

    async def main():
        server = grpc.aio.server()
        server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel("127.0.0.1:1")
        try:
            await asyncio.wait_for(channel.channel_ready(), 0.3)
        except Exception:
            pass
        for _ in range(3):
            child = await spawn(["sleep", "60"], start_new_session=True)
        print(child.pid, flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def test_spawned_process_dies_with_the_agent_and_grpc_prints_nothing() -> None:
    env = dict(os.environ, GRPC_VERBOSITY="INFO")  # INFO shows the fork-handler line
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert agent.stdout is not None
        child_pid = int(agent.stdout.readline())
        child = psutil.Process(child_pid)
        assert child.ppid() == agent.pid  # the pid is the program's, not a wrapper's
        deadline = time.monotonic() + 5
        while child.name() != "sleep" and time.monotonic() < deadline:
            time.sleep(0.05)  # setpriv and sh exec into it
        assert child.name() == "sleep"
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        child.wait(5)  # psutil.TimeoutExpired if the kernel did not kill it
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    assert agent.stderr is not None
    stderr = agent.stderr.read()
    assert "fork()" not in stderr, stderr


def test_wrapper_refuses_to_run_when_the_agent_is_already_gone() -> None:
    """The agent may die between fork and the prctl: then the wrapper must not start Envoy."""
    argv = pdeathsig_argv(["echo", "started"], parent_pid=1)  # not our parent
    if argv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 1 and "started" not in done.stdout
    argv = pdeathsig_argv(["echo", "started"], parent_pid=os.getpid())
    assert argv is not None
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 0 and done.stdout == "started\n"
