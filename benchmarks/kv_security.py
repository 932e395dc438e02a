"""What closing the KV store costs: gRPC Put and Get throughput against three kvstores side by
side, open (plain text), cluster token (plain text + a metadata check) and mutual TLS.

    .venv/bin/python benchmarks/kv_security.py [--blocks 64] [--repeats 5]

Starts its own redis-server and three kvstore subprocesses on loopback. Seeded; one warm-up
per store; the stores are measured in turn within each repeat, so machine load hits all
three alike (ratios are the figure to read). Blocks are SmolLM2-135M fp32 (737,280 bytes).
Shared-memory handoffs are not measured: their bytes never cross the socket, only the small
control RPCs are encrypted.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.kv_transfer import SMOLLM2, free_port, start_redis  # noqa: E402
from benchmarks.machine_info import cpu_model  # noqa: E402
from pdserve.healthcheck import check  # noqa: E402
from pdserve.kv.blocks import BlockKey  # noqa: E402
from pdserve.kv.grpc_transport import GrpcTransport  # noqa: E402
from pdserve.tls import ClusterSecurity, make_cluster_pki  # noqa: E402

TOKEN = "bench-token"
GB = 1e9


def modes(pki) -> dict[str, tuple[dict[str, str], ClusterSecurity]]:
    """mode -> (the store's extra environment, the client's security)."""
    client_tls = ClusterSecurity(
        cluster_name="bench", cert_file=pki.cert_file("decode"),
        key_file=pki.key_file("decode"), ca_file=pki.ca_file,
    )  # fmt: skip
    return {
        "open": ({}, ClusterSecurity(cluster_name="bench")),
        "token": (
            {"PDSERVE_CLUSTER_TOKEN": TOKEN},
            ClusterSecurity(cluster_name="bench", token=TOKEN),
        ),
        "mtls": (pki.env("kvstore"), client_tls),
    }


def start_store(redis_url: str, capacity_bytes: int, env: dict, security: ClusterSecurity):
    port = free_port()
    full = dict(
        os.environ, PDSERVE_REDIS_URL=redis_url, PDSERVE_CLUSTER_NAME="bench",
        PDSERVE_NODE_ID="bench", PDSERVE_LOG_LEVEL="warning",
        PDSERVE_KVSTORE_GRPC_HOST="127.0.0.1", PDSERVE_KVSTORE_GRPC_PORT=str(port),
        PDSERVE_KVSTORE_HTTP_PORT="0", PDSERVE_KVSTORE_BLOCK_SIZE_BYTES=str(SMOLLM2),
        PDSERVE_KVSTORE_DRAM_CAPACITY_BYTES=str(capacity_bytes),
        PDSERVE_KVSTORE_SHM_ENABLED="false", **env,
    )  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "services.kvstore"], env=full,
                            cwd=Path(__file__).parent.parent)  # fmt: skip
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not check(address, timeout_s=1.0, security=security):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("kvstore did not start")
        time.sleep(0.1)
    return proc, address


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(0)
    payload = [rng.randbytes(SMOLLM2) for _ in range(args.blocks)]
    nbytes = args.blocks * SMOLLM2
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc, redis_url = start_redis(Path(tmp))
        pki = make_cluster_pki(Path(tmp) / "tls", "bench", hosts=["127.0.0.1"])
        capacity = (args.repeats + 2) * nbytes
        procs, transports = [], {}
        try:
            for name, (env, security) in modes(pki).items():
                proc, address = start_store(redis_url, capacity, env, security)
                procs.append(proc)
                transports[name] = GrpcTransport(address, security=security, timeout_s=120)
            rates = measure(transports, payload, args.repeats, rng)
        finally:
            for t in transports.values():
                t.close()
            for p in [*procs, redis_proc]:
                p.terminate()
                p.wait(10)
    report(rates, args, nbytes)


def measure(transports, payload, repeats: int, rng) -> dict[tuple[str, str], list[float]]:
    """(mode, put|get) -> GB/s per repeat, the modes in turn within each repeat."""
    rates: dict[tuple[str, str], list[float]] = {}
    nbytes = len(payload) * len(payload[0])
    for rep in range(repeats + 1):  # repeat 0 is the warm-up
        for name, kv in transports.items():
            blocks = [(BlockKey(rng.randbytes(16)), data) for data in payload]
            start = time.perf_counter()
            kv.put_blocks(blocks)
            put_s = time.perf_counter() - start
            start = time.perf_counter()
            got = kv.get_blocks([k for k, _ in blocks])
            get_s = time.perf_counter() - start
            assert all(g is not None for g in got)
            if rep:
                rates.setdefault((name, "put"), []).append(nbytes / put_s / GB)
                rates.setdefault((name, "get"), []).append(nbytes / get_s / GB)
    return rates


def report(rates, args, nbytes: int) -> None:
    load = os.getloadavg()[0]
    print(f"kv_security: {args.blocks} blocks x {SMOLLM2} B ({nbytes / 1e6:.0f} MB) per op, "
          f"median of {args.repeats}; {cpu_model()}, {os.cpu_count()} CPUs, load {load:.1f}")  # fmt: skip
    for op in ("put", "get"):
        base = statistics.median(rates[("open", op)])
        cells = []
        for name in ("open", "token", "mtls"):
            rate = statistics.median(rates[(name, op)])
            cells.append(f"{name} {rate:.2f} GB/s ({rate / base:.2f}x)")
        print(f"  {op}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
