"""The demo app of ``vmagent dev`` and the banner's request through Envoy (pure parts; the
process test in tests/test_dev_command.py carries a real request through Envoy)."""

from __future__ import annotations

import asyncio
import json

from loopback import free_port

from vmagent.devmesh.dataplane_model import DataplaneOptions
from vmagent.devmesh.demoapp import answer, start_demo_app, xfcc_elements, xfcc_peer
from vmagent.devmesh.dev_envoy import mesh_request_lines
from vmagent.devmesh.services import MeshConfig, Port, Service, WorkloadGroup

ME = "spiffe://cluster.local/ns/vm/sa/vm-web"
CALLER = "spiffe://cluster.local/ns/default/sa/sleep"


def test_peer_is_the_uri_this_hop_added() -> None:
    # APPEND_FORWARD: an earlier hop's element first, this Envoy's last; quoted Subject may
    # hold separators.
    header = (
        f"By=spiffe://x/ns/a/sa/b;URI=spiffe://x/ns/c/sa/d,By={ME};Hash=ab12;"
        f'Subject="CN=a,O=b;c=\\"d\\"";URI={CALLER};DNS=sleep.default'
    )
    first, last = xfcc_elements(header)
    assert first == {"By": "spiffe://x/ns/a/sa/b", "URI": "spiffe://x/ns/c/sa/d"}
    assert last["Subject"] == 'CN=a,O=b;c="d"' and last["DNS"] == "sleep.default"
    assert xfcc_peer(header) == CALLER
    assert xfcc_peer(None) is None and xfcc_peer("") is None and xfcc_peer("junk") is None


def test_whoami_answers_json_and_anything_else_hello() -> None:
    kind, body = answer("vm/vm-web", "/whoami?x=1", {"x-forwarded-client-cert": f"URI={ME}"})
    assert kind == "application/json"
    assert json.loads(body) == {
        "app": "vm/vm-web",
        "peer": ME,
        "x-forwarded-client-cert": f"URI={ME}",
    }
    assert json.loads(answer("vm/vm-web", "/whoami", {})[1])["peer"] is None  # not via Envoy
    assert answer("vm/vm-web", "/healthz", {}) == ("text/plain", b"hello from vm/vm-web\n")


def test_demo_app_keeps_http11_connections_alive() -> None:
    async def scenario() -> None:
        app = await start_demo_app("vm/vm-web", free_port())
        try:
            host, port = app.address.split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            for _ in range(3):  # three requests on one connection, as Envoy sends them
                writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                assert b"Connection: keep-alive" in head
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                assert json.loads(await reader.readexactly(length))["app"] == "vm/vm-web"
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            assert (await reader.read()).endswith(b"hello from vm/vm-web\n")  # then closed
            writer.close()
        finally:
            await app.close()

    asyncio.run(scenario())


GROUP = WorkloadGroup(
    "vm-web", "vm", labels={"app": "vm-web"}, ports={"http": 8080}, source="vm.yaml"
)


def service(host: str, addresses: tuple[str, ...], resolution: str = "STATIC") -> Service:
    return Service(
        host,
        "vm",
        host.split(".")[0],
        addresses=addresses,
        resolution=resolution,
        ports=(Port("tcp", 9000, "TCP"), Port("http", 8080, "HTTP")),
        workload_selector={"app": "vm-web"},
    )


def test_banner_request_goes_to_the_first_vip_service_selecting_the_group() -> None:
    headless = service("direct.vm.svc.cluster.local", ("0.0.0.0",), "NONE")
    vip = service("vm-web.vm.svc.cluster.local", ("10.96.1.10",))
    config = MeshConfig(services=(headless, vip), groups=(GROUP,))
    options = DataplaneOptions(capture=False, outbound_bind="127.0.0.2")
    lines = mesh_request_lines(config, GROUP, options, None)
    assert lines[0].strip() == (
        "curl -s -H 'Host: vm-web.vm.svc.cluster.local' http://127.0.0.2:8080/whoami"
    )
    assert len(lines) == 2  # command + what it shows; no port warning
    assert mesh_request_lines(config, GROUP, options, 8080) == lines
    # --app-port elsewhere: Envoy still sends to the template's port; the banner says so.
    warning = mesh_request_lines(config, GROUP, options, 28080)[2]
    assert "127.0.0.1:8080" in warning and "template.ports.http: 28080 in vm.yaml" in warning
    # No fitting service: says so instead of printing a request that cannot work.
    (line,) = mesh_request_lines(MeshConfig(services=(headless,)), GROUP, options, None)
    assert "no mesh request" in line
