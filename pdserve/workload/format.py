"""The workload file format shared by ``pdserve bench``, ``pdserve sim`` and ``pdserve plan``.

A workload is a list of requests, each an arrival time and token counts:

- CSV with the Azure trace's columns ``arrived_at`` (seconds from the start),
  ``num_prefill_tokens`` (prompt length) and ``num_decode_tokens`` (output length); or
- JSON lines with the same fields plus optional ``prefix_group`` (requests of one group share
  their first ``prefix_tokens`` prompt tokens, e.g. a system prompt) and ``prefix_tokens``.

The format is chosen by the file suffix (``.csv``, else JSON lines). A malformed file raises
:class:`WorkloadError` naming the file, the line and the field. Requests are returned in
arrival order (stable for equal times), so a file need not be sorted.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REQUIRED_FIELDS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")
OPTIONAL_FIELDS = ("prefix_group", "prefix_tokens")


class WorkloadError(ValueError):
    """A workload (or profile) file that cannot be used; the message names file, line, field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, problem: str):
        where = str(path) + (f", line {line}" if line is not None else "")
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{problem}")
        self.path, self.line, self.field, self.problem = str(path), line, field, problem


@dataclass(frozen=True)
class Request:
    arrived_at_s: float
    num_prefill_tokens: int
    num_decode_tokens: int
    prefix_group: str | None = None
    prefix_tokens: int = 0  # the first prefix_tokens prompt tokens are the group's


def load(path: str | Path) -> list[Request]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise WorkloadError(path, None, None, f"cannot read: {exc.strerror}") from None
    rows = _csv_rows(path, text) if path.suffix.lower() == ".csv" else _jsonl_rows(path, text)
    requests = [_request(path, line, row) for line, row in rows]
    if not requests:
        raise WorkloadError(path, None, None, "holds no requests")
    return sorted(requests, key=lambda r: r.arrived_at_s)


def save(path: str | Path, requests: Iterable[Request]) -> None:
    """Write CSV when the suffix is .csv (prefix groups need JSON lines), else JSON lines."""
    path = Path(path)
    requests = list(requests)
    if path.suffix.lower() == ".csv":
        if any(r.prefix_group for r in requests):
            raise ValueError(f"{path}: prefix groups need JSON lines (.jsonl), not CSV")
        lines = [",".join(REQUIRED_FIELDS)]
        lines += [f"{_num(r.arrived_at_s)},{r.num_prefill_tokens},{r.num_decode_tokens}"
                  for r in requests]  # fmt: skip
    else:
        lines = [json.dumps(_as_dict(r)) for r in requests]
    path.write_text("\n".join(lines) + "\n")


def _num(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") if value else "0"


def _as_dict(r: Request) -> dict:
    out = {"arrived_at": round(r.arrived_at_s, 6), "num_prefill_tokens": r.num_prefill_tokens,
           "num_decode_tokens": r.num_decode_tokens}  # fmt: skip
    if r.prefix_group is not None:
        out.update(prefix_group=r.prefix_group, prefix_tokens=r.prefix_tokens)
    return out


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(text.splitlines())
    missing = [f for f in REQUIRED_FIELDS if f not in (reader.fieldnames or ())]
    if missing:
        raise WorkloadError(path, 1, missing[0], "missing from the CSV header")
    for row in reader:
        if None in row:
            raise WorkloadError(path, reader.line_num, None, "more values than header columns")
        yield reader.line_num, {k: v for k, v in row.items() if v not in ("", None)}


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise WorkloadError(path, line, None, f"not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise WorkloadError(path, line, None, "each line must be a JSON object")
        yield line, row


def _request(path: Path, line: int, row: dict) -> Request:
    for name in REQUIRED_FIELDS:
        if name not in row:
            raise WorkloadError(path, line, name, "missing")
    arrived = _number(path, line, row, "arrived_at", float)
    if not math.isfinite(arrived) or arrived < 0:
        raise WorkloadError(path, line, "arrived_at", f"must be a finite time >= 0, got {arrived}")
    prompt = _number(path, line, row, "num_prefill_tokens", int)
    output = _number(path, line, row, "num_decode_tokens", int)
    for name, value in (("num_prefill_tokens", prompt), ("num_decode_tokens", output)):
        if value < 1:
            raise WorkloadError(path, line, name, f"must be >= 1, got {value}")
    group = row.get("prefix_group")
    prefix = _number(path, line, row, "prefix_tokens", int) if "prefix_tokens" in row else 0
    if group is not None and not isinstance(group, str):
        group = str(group)
    if not 0 <= prefix <= prompt:
        raise WorkloadError(path, line, "prefix_tokens", f"must be in [0, {prompt}], got {prefix}")
    if prefix and group is None:
        raise WorkloadError(path, line, "prefix_group", "required when prefix_tokens > 0")
    return Request(arrived, prompt, output, group, prefix)


def _number(path: Path, line: int, row: dict, name: str, kind: type) -> float | int:
    value = row[name]
    if isinstance(value, bool):
        raise WorkloadError(path, line, name, f"must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise WorkloadError(path, line, name, f"must be a number, got {value!r}") from None
    if kind is int:
        if not number.is_integer():
            raise WorkloadError(path, line, name, f"must be a whole number, got {value!r}")
        return int(number)
    return number
