"""keep_large_buffers: multi-MiB buffers freed and allocated again on worker threads (as gRPC
delivers KV blocks) stop faulting fresh pages in. Run in subprocesses: malloc settings are
per process."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import collections, resource, sys, threading
from pdserve.kv.malloc import keep_large_buffers
if sys.argv[1] == "tuned":
    assert keep_large_buffers()
def receive():
    src, ring = bytes(2 << 20), collections.deque(maxlen=4)
    for i in range(100):
        ring.append(bytes(bytearray(src)) + b"x" * (i % 3))
        bytes(3 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
threads = [threading.Thread(target=receive) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_large_buffers_are_reused_instead_of_faulted_in():
    default, tuned = page_faults("default"), page_faults("tuned")
    assert tuned < default / 2, (default, tuned)
