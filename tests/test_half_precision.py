"""Reduced precision: bf16 through the real fairseq-train and fairseq-eval-lm on CPU (no TPU), the mask maths in
fp32 whatever the model's dtype, and one-line refusals of fp16 and amp where fairseq needs CUDA for them."""

import argparse
import copy
import logging

import pytest
import torch
from console import eval_lm, eval_lm_bits, json_logs, make_data_bin, repeating_text, run, train_command
from test_expire_span import make_model

import fairseq_expire_compat as compat
from fairseq_expire.modules import expire_span
from fairseq_expire.modules.expire_span import LayerMemory

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9): outputs and gradients of one attention layer agree with
# fp32 to a few times that, measured as ||bf16 - fp32|| / ||fp32|| (at most 0.7% here).
ATTENTION_RTOL = 0.02
# The bf16 run's valid loss (bits per token) after the same 20 updates, against the fp32 run's.
VALID_LOSS_MARGIN = 0.05


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def attention_inputs(dtype, B=2, M=8, N=24, H=16, seed=0):
    """A block and a memory older than the last 2M keys (so the CPU split path is taken), with padding; values
    rounded to bf16 in every dtype, so that dtypes differ only in how they compute."""
    generator = torch.Generator().manual_seed(seed)
    block = torch.randn(B, M, H, generator=generator).bfloat16().to(dtype).requires_grad_()
    memory = LayerMemory(
        hidden=torch.randn(B, N, H, generator=generator).bfloat16().to(dtype),
        distance=torch.arange(N, 0, -1, dtype=torch.float32).expand(B, -1),
        valid=torch.rand(B, N, generator=generator) > 0.2,
    )
    return block, memory


def attend(model, block, memory, limit=None):
    attention = model.decoder.layers[0].attention
    return attention(
        block, attention.project(memory.hidden), memory.distance, memory.valid, model.decoder.positions, limit
    )


@pytest.mark.parametrize("limit", [None, 20.5])
def test_bf16_attention_agrees_with_fp32_in_values_and_gradients(limit):
    """Same weights and inputs (bf16 values), computed in bf16 and in fp32: the spans, the span loss and |C_t| are
    computed in fp32 in both, so they agree to fp32 rounding; outputs and gradients within ATTENTION_RTOL."""
    torch.manual_seed(0)
    half = make_model(block=8, max_span=32, ramp=4, init=0.4)
    torch.nn.init.normal_(
        half.decoder.layers[0].attention.span_predictor.proj.weight, std=1.0
    )  # spans differ
    half = half.to(torch.bfloat16)
    full = copy.deepcopy(half).float()
    results = {}
    for name, model in (("fp32", full), ("bf16", half)):
        block, memory = attention_inputs(next(model.parameters()).dtype)
        out, projected, span_loss, attn_mem = attend(model, block, memory, limit)
        assert (
            projected.spans.dtype == span_loss.dtype == attn_mem.dtype == torch.float32
        )  # mask maths in fp32
        layer = model.decoder.layers[0].attention
        wanted = {
            "block": block,
            "q": layer.q_proj.weight,
            "k": layer.k_proj.weight,
            "v": layer.v_proj.weight,
            "spans": layer.span_predictor.proj.weight,
            "positions": model.decoder.positions.weight,
        }
        grads = torch.autograd.grad(out.float().square().sum() + span_loss, list(wanted.values()))
        with torch.no_grad():  # the fused (evaluation) path
            fused, *_ = attend(model, block, memory, limit)
        results[name] = dict(out=out, fused=fused, **dict(zip(wanted, grads)))
        results[name].update(spans=projected.spans.detach(), span_loss=span_loss.detach(), attn_mem=attn_mem)
    for key in ("spans", "span_loss", "attn_mem"):
        assert torch.allclose(results["bf16"][key], results["fp32"][key], rtol=1e-5), key
    for key, value in results["fp32"].items():
        assert torch.isfinite(results["bf16"][key]).all(), key
        assert relative_error(results["bf16"][key].detach(), value.detach()) < ATTENTION_RTOL, key


def test_bf16_fused_training_attention_agrees_with_the_plain_path():
    """The same bf16 model through the fused kernels and the plain path: outputs and gradients (the position
    table and the spans included) within ATTENTION_RTOL of each other."""
    torch.manual_seed(0)
    model = make_model(block=8, max_span=32, ramp=4, init=0.4)
    attention = model.decoder.layers[0].attention
    torch.nn.init.normal_(attention.span_predictor.proj.weight, std=1.0)
    model = model.to(torch.bfloat16)
    block, memory = attention_inputs(torch.bfloat16)
    parameters = [block, *model.parameters()]
    results = {}
    for kernel in ("fused", "plain"):
        model.decoder.layers[0].attention.kernel = kernel
        out, *_ = attend(model, block, memory)
        results[kernel] = [
            out,
            *torch.autograd.grad(out.float().square().sum(), parameters, allow_unused=True),
        ]
    for fused, plain in zip(results["fused"], results["plain"]):
        assert (fused is None and plain is None) or relative_error(fused, plain) < ATTENTION_RTOL


def test_bf16_training_attention_keeps_no_fp32_copy_of_its_inputs():
    """What a bf16 layer's fused training attention keeps for the backward is bf16, apart from terms per key or
    per query (spans, r, log-sum-exp): no B x T x H or B x K x M x D tensor in fp32 (the span predictor used to
    keep an fp32 copy of every memory)."""
    model = make_model(block=8, max_span=32, ramp=4, init=0.4).to(torch.bfloat16)
    block, memory = attention_inputs(torch.bfloat16)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        attend(model, block, memory)
    largest_fp32 = max(t.numel() for t in kept if t.dtype == torch.float32)
    B, N, H = memory.hidden.shape
    assert largest_fp32 <= B * (N + block.size(1)), [(tuple(t.shape), t.dtype) for t in kept]


def test_bf16_cpu_kernels_get_the_older_keys_log_m_in_fp32(monkeypatch):
    """log m stays in fp32 up to the CPU kernels, forward and backward: they read an fp32 bias whatever q's
    dtype, so it is never rounded to bf16 nor copied for them (only the last 2M keys' bias, which holds the
    position term per head, is in the model's dtype)."""
    if not expire_span._has_fused_kernel(torch.device("cpu")):
        pytest.skip("this torch has no CPU flash-attention kernel with a log-sum-exp")
    biases = {}  # the dtype and the head dimension of each call's bias
    # where the bias is among the arguments: (q, k, v, bias, ...) and (grad, q, k, v, bias, ...)
    for name, bias_at in (("_kernel_forward", 3), ("_kernel_backward", 4)):
        biases[name] = []

        def spy(*args, kernel=getattr(expire_span, name), seen=biases[name], bias_at=bias_at, **kwargs):
            seen.append((args[bias_at].dtype, args[bias_at].size(1)))
            return kernel(*args, **kwargs)

        monkeypatch.setattr(expire_span, name, spy)
    model = make_model(block=8, max_span=32, ramp=4, init=0.4).to(torch.bfloat16)
    block, memory = attention_inputs(torch.bfloat16)
    out, *_ = attend(model, block, memory)
    out.float().square().sum().backward()
    heads = model.decoder.layers[0].attention.num_heads
    assert sorted(biases["_kernel_forward"], key=str) == [(torch.bfloat16, heads), (torch.float32, 1)]
    assert biases["_kernel_backward"] == [(torch.float32, 1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_finite_with_spans_pushed_to_L(dtype):
    torch.manual_seed(0)
    L, R, M = 64, 8, 8
    model = make_model(block=M, layers=2, max_span=L, ramp=R).to(dtype)
    for layer in model.decoder.layers:
        torch.nn.init.constant_(layer.attention.span_predictor.proj.bias, 30.0)  # e = L
    tokens = torch.randint(4, 12, (2, 20 * M))
    for k in range(0, tokens.size(1), M):
        logits, extra = model(tokens[:, k : k + M], reset_memory=(k == 0))
        (logits.float().logsumexp(-1).mean() + extra["span_loss"]).backward()
        assert torch.isfinite(logits).all() and torch.isfinite(extra["span_loss"])
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert extra["span_max"] == pytest.approx(L)
    assert min(len(memory) for memory in model.decoder.memory()) > L  # the memory reached L
    model.eval()
    with torch.no_grad():
        logits, _ = model(tokens[:, :M], reset_memory=True)
        for k in range(M, tokens.size(1), M):
            logits, _ = model(tokens[:, k : k + M])
            assert torch.isfinite(logits).all()


def test_bf16_keeps_the_tpu_only_when_asked():
    from fairseq import options

    def parse(*extra):
        parser = options.get_training_parser()
        return options.parse_args_and_arch(
            parser, ["/nonexistent", "--task", "language_modeling", "--arch", "transformer_lm", *extra]
        )

    assert parse("--bf16").tpu is False and parse("--bf16").bf16
    assert parse("--memory-efficient-bf16").tpu is False
    assert parse("--bf16", "--tpu").tpu is True  # fairseq's real TPU path, untouched
    assert parse().tpu is False


def test_bf16_on_a_cpu_without_native_bf16_says_so(monkeypatch, caplog):
    monkeypatch.setattr(compat, "_native_bf16", lambda cuda: False)
    args = argparse.Namespace(tpu=False, cpu=True, fp16=False, amp=False, bf16=True)
    with caplog.at_level(logging.WARNING, logger="fairseq_expire_compat"):
        compat._check_reduced_precision(args)
    assert "no native bf16" in caplog.text and "slower than fp32" in caplog.text


def test_eval_lm_converts_the_models_to_bf16():
    """fairseq-eval-lm's main converts models for --fp16 only; the fix converts them for --bf16 (not for --tpu)."""
    seen = []
    module = argparse.Namespace(
        eval_lm=lambda models, **kwargs: seen.extend(p.dtype for p in models[0].parameters())
    )
    module.main = lambda cfg: module.eval_lm(models=[torch.nn.Linear(2, 2)])
    compat._eval_lm_in_bf16(module)
    for bf16, tpu, dtype in (
        (True, False, torch.bfloat16),
        (False, False, torch.float32),
        (True, True, torch.float32),
    ):
        seen.clear()
        module.main(argparse.Namespace(common=argparse.Namespace(bf16=bf16, tpu=tpu)))
        assert set(seen) == {dtype}


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    root = tmp_path_factory.mktemp("half")
    return make_data_bin(root / "data", repeating_text(8000, 24), repeating_text(1600, 24, seed=1))


def eval_lm_blocks(data, checkpoint, *extra, check=True):
    return eval_lm(data, checkpoint, "--tokens-per-sample", 16, "--batch-size", 4, *extra, check=check)


def eval_loss(result) -> float:
    return eval_lm_bits(result.stdout + result.stderr)


@pytest.mark.slow
def test_bf16_fairseq_train_and_eval_lm_reach_the_fp32_loss(data_bin, tmp_path):
    losses = {}
    for name, extra in (
        ("fp32", []),
        ("bf16", ["--bf16"]),
        ("memory_efficient_bf16", ["--memory-efficient-bf16"]),
    ):
        result = run(
            "fairseq-train", *train_command(data_bin, tmp_path / name, *extra, "--no-epoch-checkpoints")
        )
        losses[name] = float(json_logs(result.stdout + result.stderr, "valid")[-1]["valid_loss"])
        common = torch.load(tmp_path / name / "checkpoint_last.pt", weights_only=False)["cfg"]["common"]
        assert (common["bf16"], common["tpu"]) == (name != "fp32", False)  # checkpoints are saved in fp32
    for name in ("bf16", "memory_efficient_bf16"):
        assert losses[name] == pytest.approx(losses["fp32"], abs=VALID_LOSS_MARGIN), losses
        assert losses[name] != losses["fp32"]  # it did compute in bf16
    checkpoint = tmp_path / "bf16" / "checkpoint_last.pt"
    in_fp32, in_bf16 = eval_loss(eval_lm_blocks(data_bin, checkpoint)), eval_loss(
        eval_lm_blocks(data_bin, checkpoint, "--bf16")
    )
    assert in_bf16 == pytest.approx(in_fp32, abs=VALID_LOSS_MARGIN)


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--fp16", "--amp", "--memory-efficient-fp16"])
def test_fp16_and_amp_on_cpu_stop_in_one_line_naming_bf16(data_bin, tmp_path, flag):
    for result in (
        run("fairseq-train", *train_command(data_bin, tmp_path, flag), check=False),
        eval_lm_blocks(data_bin, tmp_path / "checkpoint_last.pt", flag, check=False),
    ):
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1].startswith("error: --")
        assert "use --bf16 on CPU" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoint_last.pt").exists()
