"""``pdserve up``'s stop signals: whatever arrives while the stack is stopping, the teardown
completes and the launcher exits 0. A launcher process (``launcher.up``) runs one stand-in
child that takes two seconds to stop, so a signal can be sent while the launcher waits for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The stand-in child: on SIGTERM it takes two seconds to exit (a draining service).
CHILD = """
import os, signal, sys, time
def on_term(*_):
    print("child stopping", flush=True)
    time.sleep(2.0)
    os._exit(0)
signal.signal(signal.SIGTERM, on_term)
print("child ready", os.getpid(), flush=True)
while True:
    time.sleep(1)
"""

# The launcher with the stand-in as its only child; ``late``: a signal it sends itself after
# ``up`` has returned (one arriving while the process exits).
LAUNCHER = """
import os, sys
from pathlib import Path
from pdserve import launcher

def start(stack):
    stack._spawn("stand-in", "kvstore", [sys.executable, "-c", {child!r}], {{}})

launcher.Stack.start = start
config = launcher.StackConfig(log_dir=Path({log_dir!r}))
code = launcher.up(config, echo=lambda line: print(line, flush=True))
if {late}:
    os.kill(os.getpid(), {late})
sys.exit(code)
"""


def _wait_for(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _start(tmp_path: Path, late: int = 0) -> tuple[subprocess.Popen, Path]:
    script = LAUNCHER.format(child=CHILD, log_dir=str(tmp_path), late=late)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    while (line := proc.stdout.readline()) and line.strip() != "ready":
        lines.append(line)
    assert line.strip() == "ready", "".join(lines)
    log = tmp_path / "stand-in.log"
    _wait_for(lambda: "child ready" in log.read_text(), "the stand-in to start")
    return proc, log


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_teardown_neither_cuts_it_short_nor_changes_the_exit_code(
    tmp_path, second
):
    proc, log = _start(tmp_path)
    child_pid = int(log.read_text().split("child ready")[1].split()[0])
    proc.send_signal(signal.SIGTERM)
    # The launcher is in its teardown, waiting for the stand-in to drain.
    _wait_for(lambda: "child stopping" in log.read_text(), "the stand-in's SIGTERM")
    proc.send_signal(second)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    assert "stopping ..." in output
    assert not _alive(child_pid), "the launcher returned before its child had stopped"


def test_sigint_alone_stops_the_stack_with_exit_0(tmp_path):
    proc, log = _start(tmp_path)
    child_pid = int(log.read_text().split("child ready")[1].split()[0])
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    assert not _alive(child_pid)


@pytest.mark.parametrize("late", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_after_the_teardown_while_the_launcher_exits_keeps_exit_0(tmp_path, late):
    proc, _ = _start(tmp_path, late=int(late))
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
