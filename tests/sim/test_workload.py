"""Workload format, generators, the packaged trace and RESULT.json (pure, fast)."""

from __future__ import annotations

import json

import pytest

from pdserve.workload import generate, result
from pdserve.workload.format import Request, WorkloadError, load, save


def test_csv_and_jsonl_round_trip(tmp_path):
    requests = [Request(0.0, 10, 3), Request(0.5, 20, 4, "sys", 8)]
    save(tmp_path / "w.jsonl", requests)
    assert load(tmp_path / "w.jsonl") == requests
    save(tmp_path / "w.csv", requests[:1])
    assert load(tmp_path / "w.csv") == requests[:1]
    with pytest.raises(ValueError, match="prefix groups need JSON lines"):
        save(tmp_path / "x.csv", requests)


def test_load_sorts_by_arrival(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n2,5,1\n1,6,1\n")
    assert [r.num_prefill_tokens for r in load(path)] == [6, 5]


@pytest.mark.parametrize(
    ("name", "text", "line", "field", "problem"),
    [
        ("a.csv", "arrived_at,num_prefill_tokens\n0,1\n", 1, "num_decode_tokens", "missing"),
        ("b.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\n1,x,1\n", 3,
         "num_prefill_tokens", "must be a number, got 'x'"),
        ("c.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n-1,1,1\n", 2, "arrived_at",
         "finite time >= 0"),
        ("d.jsonl", '{"arrived_at": 0, "num_prefill_tokens": 4, "num_decode_tokens": 1}\n{oops\n',
         2, None, "not JSON"),
        ("e.jsonl", '{"arrived_at": 0, "num_prefill_tokens": 4, "num_decode_tokens": 0}\n', 1,
         "num_decode_tokens", "must be >= 1"),
        ("f.jsonl", '{"arrived_at": 0, "num_prefill_tokens": 4, "num_decode_tokens": 2, '
         '"prefix_tokens": 2}\n', 1, "prefix_group", "required"),
        ("g.jsonl", '{"arrived_at": 0, "num_prefill_tokens": 4.5, "num_decode_tokens": 2}\n', 1,
         "num_prefill_tokens", "whole number"),
    ],
)  # fmt: skip
def test_malformed_files_name_file_line_and_field(tmp_path, name, text, line, field, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(WorkloadError, match=problem) as info:
        load(path)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), line, field)
    assert str(info.value).startswith(f"{path}, line {line}: ")


def test_packaged_azure_trace_and_its_attribution():
    trace = generate.azure_conv()
    assert len(trace) == 19366
    assert trace[1] == Request(4.314579, 396, 109)
    readme = (generate.trace_path().parent / "README.md").read_text()
    assert "CC-BY 4.0" in readme and "Azure" in readme
    scaled = generate.azure_conv(time_scale=10, length_scale=0.5, max_requests=2)
    assert [(r.num_prefill_tokens, r.num_decode_tokens) for r in scaled] == [(187, 22), (198, 54)]
    assert scaled[1].arrived_at_s == pytest.approx(43.14579)


def test_synthetic_is_seeded_and_hits_the_rate():
    a = generate.synthetic(2000, 4.0, seed=3, shared_prefix_tokens=64, shared_share=0.5)
    assert a == generate.synthetic(2000, 4.0, seed=3, shared_prefix_tokens=64, shared_share=0.5)
    assert generate.mean_rate_rps(a) == pytest.approx(4.0, rel=0.1)
    shared = [r for r in a if r.prefix_group]
    assert 0.4 < len(shared) / len(a) < 0.6
    assert all(r.prefix_tokens == 64 and r.num_prefill_tokens > 64 for r in shared)


def test_bursty_arrivals_have_the_asked_variation():
    import statistics

    a = generate.synthetic(4000, 2.0, burstiness_cv=3.0, seed=1)
    gaps = [b.arrived_at_s - a_.arrived_at_s for a_, b in zip(a, a[1:], strict=False)]
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(3.0, rel=0.2)


def test_length_specs():
    import random

    rng = random.Random(0)
    assert generate.Lengths("fixed:7").sampler(rng, "num_prefill_tokens")() == 7
    draws = [generate.Lengths("uniform:3:5").sampler(rng, "x")() for _ in range(200)]
    assert set(draws) == {3, 4, 5}
    with pytest.raises(ValueError, match="use fixed:N"):
        generate.Lengths("gauss:1").sampler(rng, "x")


def test_at_rate_rescales_arrivals():
    w = [Request(10.0, 1, 1), Request(12.0, 1, 1), Request(14.0, 1, 1)]
    assert [r.arrived_at_s for r in generate.at_rate(w, 2.0)] == [0.0, 0.5, 1.0]


def test_result_shape_and_figures():
    records = [result.RequestRecord(0, 0.0, 10, 0), result.RequestRecord(1, 1.0, 10, 0),
               result.RequestRecord(2, 2.0, 10, 0, error="boom")]  # fmt: skip
    records[0].finish(0.5, 1.5, 3)  # TPOT 0.5
    records[1].finish(3.0, 3.2, 5)  # TTFT misses a 2 s target
    res = result.build(records, [0.5, 0.05], [2, 4], result.Slo(2.0, 0.6), "sim", {})
    assert set(res) >= {"ttft_s", "itl_s", "e2e_s", "output_tokens_per_s", "slo_attainment",
                        "goodput_rps", "requests"}  # fmt: skip
    assert res["ttft_s"] == {"p50": 0.5, "p90": 3.0, "p99": 3.0}
    assert res["itl_s"] == {"p50": 0.05, "p90": 0.5, "p99": 0.5}
    assert res["duration_s"] == 4.2  # first arrival 0 to the last token at 1 + 3.2
    assert res["output_tokens_per_s"] == pytest.approx(8 / 4.2)
    assert res["slo_attainment"] == pytest.approx(1 / 3)
    assert res["goodput_rps"] == pytest.approx(1 / 4.2)
    assert res["num_failed"] == 1
    assert json.loads(json.dumps(res))["requests"][0]["tpot_s"] == 0.5
