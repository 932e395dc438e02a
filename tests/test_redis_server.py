"""The RedisServer test helper (tests/conftest.py): its port is picked before redis-server binds
it, so another process can take it in between; the helper must still bring a server up on its
first start, keep its port on a restart, and say so when it cannot."""

from __future__ import annotations

import socket
import threading

import pytest
import redis

import tests.conftest as helpers
from tests.conftest import RedisServer


def listener(port: int = 0) -> socket.socket:
    """Another process's listener on ``port`` (0: a free one)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server sets it
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def serves(server: RedisServer) -> bool:
    """Whether the server on ``server.url`` is ``server``'s own redis-server."""
    with redis.Redis.from_url(server.url, socket_timeout=2) as client:
        return client.info("server")["process_id"] == server._proc.pid


def test_a_picked_port_taken_before_redis_binds_it_is_replaced(tmp_path, monkeypatch):
    free_port = helpers.free_port
    with listener() as taken_by_another:
        taken = taken_by_another.getsockname()[1]
        picks = iter([taken])  # then free ones
        monkeypatch.setattr(helpers, "free_port", lambda: next(picks, None) or free_port())
        server = RedisServer(tmp_path)
        assert server.port == taken
        try:
            server.start()
            assert server.port != taken
            assert serves(server)
        finally:
            server.stop()
    assert "Address already in use" in (tmp_path / "redis-server.log").read_text()


def test_a_restart_waits_for_its_port_to_be_freed(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    port = server.port
    try:
        server.stop()
        with listener(port) as taken_by_another:
            release = threading.Timer(0.5, taken_by_another.close)
            release.start()
            try:
                server.start()
            finally:
                release.join()
        assert server.port == port
        assert serves(server)
        assert "Address already in use" in (tmp_path / "redis-server.log").read_text()
    finally:
        server.stop()


def test_a_restart_on_a_port_kept_in_use_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(helpers, "PORT_WAIT_S", 0.5)
    server = RedisServer(tmp_path)
    server.start()
    server.stop()
    with listener(server.port), pytest.raises(RuntimeError) as error:
        server.start()
    assert f"listen on 127.0.0.1:{server.port}: the port has been in use" in str(error.value)
    assert server._proc is None
