"""``pdserve up``'s ports: each service binds its own (a free one, or a default that was free)
and reports it, so no other process can take a port between the launcher's choice and the
service's bind; a default port taken in that window stops the start with an error naming it.

``PortThief`` makes that window certain: every port the launcher binds and lets go (to pick
one, or to look whether a default is free) is taken at once by a listener held here."""

from __future__ import annotations

import re
import socket

import pytest
import redis

from pdserve import launcher
from pdserve.config import advertised_address
from pdserve.launcher import HOST, Stack, StackConfig

pytestmark = [pytest.mark.timeout(600)]

BLOCK_BYTES = 737_280
STACK_ENV = {
    "PDSERVE_DECODE_KV_CACHE_BYTES": str(64 * BLOCK_BYTES),
    "PDSERVE_KVSTORE_DRAM_CAPACITY_BYTES": str(64 * BLOCK_BYTES),
    "PDSERVE_DECODE_NUM_THREADS": "1",
    "PDSERVE_DECODE_QUANTIZATION": "none",
    "PDSERVE_ROUTER_QUANTIZATION": "none",
    "PDSERVE_PREFILL_QUANTIZATION": "none",
}


class PortThief:
    """Stands in for the ``socket`` module in pdserve.launcher."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit  # how many ports to take (None: every one)
        self.stolen: dict[int, socket.socket] = {}

    def __getattr__(self, name: str):
        return getattr(socket, name)

    def socket(self, *args, **kwargs) -> socket.socket:
        thief = self

        class Probe(socket.socket):
            def close(self) -> None:
                port = self.getsockname()[1] if self.fileno() != -1 else 0
                super().close()
                if port:
                    thief.take(port)

        return Probe(*args, **kwargs)

    def take(self, port: int) -> None:
        if self.limit is not None and len(self.stolen) >= self.limit:
            return
        holder = socket.socket()
        try:
            holder.bind((HOST, port))
        except OSError:  # taken already
            holder.close()
            return
        holder.listen()
        self.stolen[port] = holder

    def give_back(self) -> None:
        for holder in self.stolen.values():
            holder.close()


@pytest.fixture
def thief(monkeypatch):
    stealing = PortThief()
    monkeypatch.setattr(launcher, "socket", stealing)
    yield stealing
    stealing.give_back()


def test_an_advertised_address_with_port_0_names_the_port_bound():
    assert advertised_address("127.0.0.1:0", "node", 41234) == "127.0.0.1:41234"
    assert advertised_address("prefill:50061", "node", 41234) == "prefill:50061"
    assert advertised_address(None, "node", 41234) == "node:41234"


@pytest.mark.slow
def test_the_stack_starts_though_any_port_the_launcher_lets_go_is_taken(
    tmp_path, redis_server, thief
):
    config = StackConfig(
        num_prefill=0, num_decode=1, redis_url=redis_server.url, default_ports=False,
        env=STACK_ENV, log_dir=tmp_path, cluster_name="ports",
    )  # fmt: skip
    with Stack(config) as stack:
        ports = {int(address.rsplit(":", 1)[1]) for address in (
            stack.grpc_address, stack.kvstore_address, stack.endpoints()["decode-0"],
        )} | {stack.http_port}  # fmt: skip
        assert not ports & set(thief.stolen)
        for child in stack.children:  # what each reported is what it listens on
            for port in (child.grpc_port, child.http_port):
                with pytest.raises(OSError), socket.socket() as s:
                    s.bind((HOST, port))


def test_a_default_port_taken_before_the_service_binds_it_stops_the_start_naming_both(
    tmp_path, redis_server, thief
):
    config = StackConfig(
        num_prefill=0, num_decode=1, redis_url=redis_server.url, default_ports=True,
        env=STACK_ENV, log_dir=tmp_path, cluster_name="ports", startup_timeout_s=120,
    )  # fmt: skip
    stack = Stack(config)
    with pytest.raises(RuntimeError) as info:
        stack.start()
    found = re.search(
        r"(\S+) could not listen on 127\.0\.0\.1:(\d+): the port is in use", str(info.value)
    )
    assert found, str(info.value)
    assert int(found.group(2)) in thief.stolen
    assert found.group(1) in ("kvstore", "decode-0", "router")
    assert stack.children == []  # every child stopped


@pytest.mark.slow
def test_redis_is_started_again_on_another_port_when_its_port_is_taken(tmp_path, monkeypatch):
    thief = PortThief(limit=1)  # redis-server's port is the one the launcher picks first
    monkeypatch.setattr(launcher, "socket", thief)
    config = StackConfig(num_prefill=0, num_decode=1, default_ports=False, env=STACK_ENV,
                         log_dir=tmp_path, cluster_name="ports")  # fmt: skip
    try:
        with Stack(config) as stack:
            port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
            assert len(thief.stolen) == 1 and port not in thief.stolen
            assert redis.Redis.from_url(stack.redis_url).ping()
    finally:
        thief.give_back()


@pytest.mark.slow
def test_redis_is_started_again_when_another_redis_took_its_port(tmp_path, monkeypatch,
                                                                  redis_server):  # fmt: skip
    """Another Redis answering on the picked port is not the stack's: the launcher's own
    exits at once (the port is in use) and is started again on another port."""
    taken = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    picks = iter([taken])
    real_pick = launcher.pick_port
    monkeypatch.setattr(launcher, "pick_port", lambda: next(picks, None) or real_pick())
    config = StackConfig(num_prefill=0, num_decode=1, default_ports=False, env=STACK_ENV,
                         log_dir=tmp_path, cluster_name="ports")  # fmt: skip
    with Stack(config) as stack:
        assert not stack.redis_url.startswith(f"redis://{HOST}:{taken}/")
        assert redis.Redis.from_url(stack.redis_url).info("server")["process_id"] == (
            stack.child("redis").proc.pid
        )
