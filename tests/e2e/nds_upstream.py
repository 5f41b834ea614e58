#!/usr/bin/env python3
"""A scripted ADS upstream that pushes big NameTables over NDS (the e2e scale test and
``bench/dns_table_bench.py --nds``; devmesh cannot load 100k services quickly).

    python tests/e2e/nds_upstream.py --listen 127.0.0.1:15010 --services 100000

Serves ``StreamAggregatedResources`` (state of the world, plaintext: the agent allows that on
port 15010 only, as Istio does) on loopback. Every stream gets table version 0 as soon as it
asks for NameTables; SIGUSR1 pushes the next version to every open stream, SIGUSR2 the next
version with one invalid address (to be NACKed). Table version ``v`` holds ``--services``
Kubernetes services, ``svc<i>.ns<i % 100>.svc.cluster.local``, with the addresses
``<10+v>.<i>`` (10/8 for v0, 11/8 for v1, ...). Prints one line per event on stdout, after a
CLOCK_MONOTONIC time stamp: ``listening``, ``pushed v<N> <bytes>``, ``ack v<N>``,
``nack n<N> <message>``. Other requests (health reports) are ignored. Not part of the test
suite; exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import grpc.aio
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.protobuf import any_pb2

from vmagent._proto import nds_pb2
from vmagent.xds.session import NAME_TABLE_TYPE

NAMESPACES = 100


def ads_address() -> str:
    """A loopback address whose port 15010 is free (the agent allows plaintext xDS only on
    that port, as Istio's agent does)."""
    for last in range(150, 250):
        host = f"127.0.0.{last}"
        with socket.socket() as probe:
            try:
                probe.bind((host, 15010))
            except OSError:
                continue
        return f"{host}:15010"
    raise RuntimeError("no loopback address with port 15010 free")


def table_bytes(services: int, version: int, bad: bool = False) -> bytes:
    """The serialized NameTable of table ``version`` (see the module docstring); ``bad``: the
    last service's address is not an IP address."""
    table = nds_pb2.NameTable()
    entries = table.table
    first = 10 + version
    for i in range(services):
        info = entries[f"svc{i}.ns{i % NAMESPACES}.svc.cluster.local"]
        info.ips.append(f"{first}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        info.registry = "Kubernetes"
        info.shortname = f"svc{i}"
        info.namespace = f"ns{i % NAMESPACES}"
    if bad:
        entries[f"svc{services - 1}.ns{(services - 1) % NAMESPACES}.svc.cluster.local"].ips[0] = (
            "not-an-ip"
        )
    return table.SerializeToString()


def say(line: str) -> None:
    print(f"{time.monotonic():.6f} {line}", flush=True)


class Upstream(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, services: int) -> None:
        self.services = services
        self.version = 0
        self.tables: dict[int, bytes] = {}
        self.bad: set[int] = set()
        self.streams: list[asyncio.Queue[int]] = []

    def table(self, version: int) -> bytes:
        if version not in self.tables:
            self.tables[version] = table_bytes(self.services, version, version in self.bad)
        return self.tables[version]

    def push_next(self, bad: bool = False) -> None:
        self.version += 1
        if bad:
            self.bad.add(self.version)
            self.tables.pop(self.version, None)
        self.table(self.version)
        for queue in self.streams:
            queue.put_nowait(self.version)

    async def StreamAggregatedResources(
        self, requests: AsyncIterator[DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[DiscoveryResponse]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        self.streams.append(queue)
        reader = asyncio.ensure_future(self._read(requests, queue))
        try:
            while True:
                version = await queue.get()
                data = self.table(version)
                resource = any_pb2.Any(type_url=NAME_TABLE_TYPE, value=data)
                say(f"pushed v{version} {len(data)}")
                yield DiscoveryResponse(
                    type_url=NAME_TABLE_TYPE,
                    version_info=f"v{version}",
                    nonce=f"n{version}",
                    resources=[resource],
                )
        finally:
            reader.cancel()
            self.streams.remove(queue)

    async def _read(
        self, requests: AsyncIterator[DiscoveryRequest], queue: asyncio.Queue[int]
    ) -> None:
        asked = False
        async for request in requests:
            if request.type_url != NAME_TABLE_TYPE:
                continue
            if not asked:
                asked = True
                queue.put_nowait(self.version)
            elif request.HasField("error_detail"):
                say(f"nack {request.response_nonce} {request.error_detail.message!r}")
            else:
                say(f"ack {request.version_info}")


async def serve(listen: str, services: int) -> None:
    upstream = Upstream(services)
    upstream.table(0)
    upstream.table(1)  # ready before SIGUSR1: the push is timed from the signal
    server = grpc.aio.server(options=[("grpc.max_send_message_length", -1)])
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(upstream, server)
    server.add_insecure_port(listen)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, upstream.push_next)
    loop.add_signal_handler(signal.SIGUSR2, upstream.push_next, True)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    say("listening")
    await stop.wait()
    await server.stop(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="host:port (port 15010: plaintext)")
    parser.add_argument("--services", type=int, default=100_000)
    args = parser.parse_args(argv)
    if not args.listen.startswith(("127.", "[::1]")):
        parser.error("--listen must be a loopback address")
    asyncio.run(serve(args.listen, args.services))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
