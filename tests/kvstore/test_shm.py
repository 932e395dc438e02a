"""The store's shared segment: created with every page already faulted in (cleared), so the
first write into a block slot, a prefill worker's put on its compute core, takes no page
clear."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from pdserve.kv import shm
from pdserve.kv.shm import SharedSegment

SHM_DIR = Path("/dev/shm")
SIZE = 4 << 20


def _resident_bytes(path: Path) -> int:
    """Resident bytes of this process's mapping of ``path`` (/proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(str(path)))
    rss = next(line for line in lines[start + 1 :] if line.startswith("Rss:"))
    return int(rss.split()[1]) * 1024


@pytest.fixture
def path():
    if not SHM_DIR.is_dir():
        pytest.skip("no /dev/shm")
    p = SHM_DIR / f"pdserve-test-{uuid.uuid4().hex[:8]}.kv"
    yield p
    p.unlink(missing_ok=True)


def test_create_faults_in_every_page(path):
    segment = SharedSegment.create(path, SIZE)
    try:
        assert _resident_bytes(path) == SIZE
        assert bytes(segment.view[:16]) == bytes(16)
    finally:
        segment.close()
    assert not path.exists()


def test_create_without_populate_support_writes_every_page(path, monkeypatch):
    monkeypatch.setattr(shm, "_MADV_POPULATE_WRITE", -1)  # what an older kernel answers: EINVAL
    segment = SharedSegment.create(path, SIZE + 4096)  # not a multiple of the zero chunk
    try:
        assert _resident_bytes(path) == SIZE + 4096
        assert bytes(segment.view[-16:]) == bytes(16)
    finally:
        segment.close()
