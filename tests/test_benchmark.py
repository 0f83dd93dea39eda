"""scripts/benchmark.py runs end to end on the tiny configuration and reports every figure it promises."""

import json

import pytest
from console import run

pytestmark = pytest.mark.slow


def test_benchmark_reports_speed_memory_and_the_cache_speedup(tmp_path):
    out = tmp_path / "bench.json"
    result = run(
        "python", "scripts/benchmark.py", "--config", "tiny", "--lengths", 64,
        "--batches", 2, "--warmup", 1, "--json", out,
    )  # fmt: skip
    rows = json.loads(out.read_text())
    kinds = {(r["model"], r["mode"]) for r in rows}
    assert {
        ("expire_span_lm", "train"),
        ("expire_span_lm", "eval+cache"),
        ("expire_span_lm", "eval"),
    } <= kinds
    assert ("fixed_span_lm", "train") in kinds
    # the paper's Table 4 rows, at the same L (the compressive memory has no evaluation cache)
    assert {("adaptive_span_lm", "train"), ("adaptive_span_lm", "eval+cache")} <= kinds
    assert {("compressive_lm", "train"), ("compressive_lm", "eval")} <= kinds
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["peak_memory_mb"] > 0
        assert all(0 < kept <= 64 + 8 for kept in row["memory_per_layer"])  # L + R
    (cached,) = [r for r in rows if r["model"] == "expire_span_lm" and r["mode"] == "eval+cache"]
    assert cached["cache_speedup"] > 0 and cached["cache_bound"] > 1
    assert "| cache speed-up (bound) |" in result.stdout
