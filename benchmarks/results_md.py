"""benchmarks/RESULTS.md: each benchmark owns one section, between its own markers, and
rewrites only that section."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(name: str, title: str, body: str, path: Path = RESULTS) -> None:
    """Replace the section ``name`` (``<!-- name:begin -->`` … ``<!-- name:end -->``), or
    append it when the file does not have it yet."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n## {title}\n\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
