"""benchmarks/results_md.py: a benchmark rewrites its own section of RESULTS.md only."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from results_md import write_section  # noqa: E402


def test_a_section_is_appended_then_replaced_leaving_the_others(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_section("engine", "Engine", "first\n", path)
    write_section("peers", "Peers", "theirs", path)
    write_section("engine", "Engine", "second", path)
    assert path.read_text() == (
        "# Benchmark results\n\n"
        "<!-- engine:begin -->\n## Engine\n\nsecond\n<!-- engine:end -->\n\n"
        "<!-- peers:begin -->\n## Peers\n\ntheirs\n<!-- peers:end -->\n"
    )
