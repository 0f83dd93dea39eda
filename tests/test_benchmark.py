"""scripts/benchmark.py (fairseq_expire/benchmark.py) runs end to end on the tiny configuration and reports every
figure it promises."""

import json

import pytest
from console import run

pytestmark = pytest.mark.slow


def benchmark(tmp_path, *args):
    """scripts/benchmark.py on the tiny configuration at L = 64: its output and its JSON rows."""
    out = tmp_path / "bench.json"
    result = run("python", "scripts/benchmark.py", "--config", "tiny", "--lengths", 64, *args, "--json", out)
    return result, json.loads(out.read_text())


def test_benchmark_reports_speed_memory_and_the_cache_speedup(tmp_path):
    result, rows = benchmark(tmp_path, "--batches", 2, "--warmup", 1)
    kinds = {(r["model"], r["mode"]) for r in rows}
    assert {("expire_span_lm", mode) for mode in ("train", "eval+cache", "eval")} <= kinds
    assert ("fixed_span_lm", "train") in kinds
    # the paper's Table 4 rows, at the same L (the compressive memory has no evaluation cache)
    assert {("adaptive_span_lm", "train"), ("adaptive_span_lm", "eval+cache")} <= kinds
    assert {("compressive_lm", "train"), ("compressive_lm", "eval")} <= kinds
    for row in rows:
        assert (
            row["tokens_per_s"] > 0 and 0 < row["peak_memory_mb"] < row["peak_rss_mb"]
        )  # less the libraries
        assert all(0 < kept <= 64 + 8 for kept in row["mem_per_layer"])  # L + R
    (cached,) = [r for r in rows if r["model"] == "expire_span_lm" and r["mode"] == "eval+cache"]
    assert cached["cache_speedup"] > 0 and cached["cache_bound"] > 1
    assert "| cache speed-up (bound) |" in result.stdout


def test_benchmark_puts_bf16_beside_fp32(tmp_path):
    result, (fp32, bf16) = benchmark(
        tmp_path, "--models", "expire_span_lm", "--modes", "train", "--no-follow", "--dtypes", "fp32", "bf16",
        "--batches", 2, "--warmup", 1,
    )  # fmt: skip
    assert (fp32["dtype"], bf16["dtype"]) == ("fp32", "bf16")
    assert bf16["fp32"]["tokens_per_s"] == fp32["tokens_per_s"] and bf16["tokens_per_s"] > 0
    assert "| vs fp32 (peak mem) |" in result.stdout and "| bf16 |" in result.stdout
    # MFU against the matmul peak measured in each dtype at the start
    assert "matmul peak fp32:" in result.stdout and "bf16:" in result.stdout
    for row in (fp32, bf16):
        assert row["model_tflops"] > 0 and 0 < row["mfu"] < 1


def test_benchmark_reports_generated_tokens_per_second_against_fixed_span_and_recompute(tmp_path):
    result, rows = benchmark(tmp_path, "--modes", "generate", "--generate-tokens", 20, "--warmup", 2)
    kinds = {(r["model"], r["mode"]) for r in rows}
    expected = [
        ("expire_span_lm", "generate"),
        ("expire_span_lm", "generate-recompute"),
        ("fixed_span_lm", "generate"),
    ]
    assert set(expected) <= kinds
    followed = [r for r in rows if r["model"] == "fixed_span_lm" and r["max_span"] < 64]
    assert followed and followed[0]["mode"] == "generate"  # L = S, the learned mean span (>= M)
    for row in rows:
        assert row["tokens_per_s"] > 0
        assert all(0 < kept <= 64 + 8 for kept in row["mem_per_layer"])
    assert "| generate-recompute |" in result.stdout


def test_benchmark_puts_the_fused_training_attention_beside_the_plain_one(tmp_path):
    result, (plain, fused) = benchmark(
        tmp_path, "--models", "expire_span_lm", "--modes", "train", "--no-follow", "--attention-kernels",
        "plain", "fused", "--batches", 2, "--warmup", 1, "--streams", 3,
    )  # fmt: skip
    assert (plain["attention_kernel"], fused["attention_kernel"]) == ("plain", "fused")
    assert plain["streams"] == fused["streams"] == 3  # --streams overrides the configuration's batch
    assert fused["plain"]["peak_memory_mb"] == plain["peak_memory_mb"] and fused["tokens_per_s"] > 0
    assert "| vs plain (peak mem) |" in result.stdout and "| predicted MB/layer |" in result.stdout
    assert "memory model at the paper's enwik8 batch per GPU" in result.stdout and "fused" in result.stdout


def test_benchmark_trains_bf16_without_fp32_master_weights_as_memory_efficient_bf16_does(tmp_path):
    result, (row,) = benchmark(
        tmp_path, "--models", "expire_span_lm", "--modes", "train", "--no-follow", "--dtypes", "bf16",
        "--memory-efficient-bf16", "--batches", 2, "--warmup", 1,
    )  # fmt: skip
    assert row["memory_efficient_bf16"] and row["tokens_per_s"] > 0
    assert "| bf16, memory-efficient |" in result.stdout


def test_memory_efficient_bf16_optimizer_steps_the_bf16_weights_with_no_fp32_copy():
    import torch
    from fairseq import optim

    from fairseq_expire.benchmark import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8).to(torch.bfloat16)
    before = model.weight.detach().clone()
    optimizer = build_optimizer(model, torch.bfloat16, memory_efficient=True)
    assert isinstance(optimizer, optim.MemoryEfficientFP16Optimizer) and not hasattr(optimizer, "fp32_params")
    optimizer.backward(model(torch.randn(4, 8, dtype=torch.bfloat16)).float().square().sum())
    optimizer.step()
    assert model.weight.dtype == torch.bfloat16 and not torch.equal(model.weight, before)
    assert isinstance(build_optimizer(model, torch.bfloat16), optim.FP16Optimizer)
