"""On a CUDA GPU: every attention path (training: fused and plain) against the paper's dense formula in fp32, bf16 and fp16; short fairseq-train
runs in --bf16 and --fp16; two-GPU NCCL training equal to one GPU with all the streams; no host sync inside the
per-layer forward. Skipped without CUDA (``make gpu-check`` runs this file and the benchmark's GPU rows)."""

import copy

import pytest
import torch
from console import json_logs, run, train_command
from test_expire_span import make_model, reference_attention
from test_half_precision import attention_inputs, data_bin, relative_error  # noqa: F401 (a fixture)
from test_task_cli import free_port

from fairseq_expire.modules.expire_span import LayerMemory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# ||cuda - reference|| / ||reference||, the reference in fp64 on CPU from the same (bf16-rounded) weights and inputs.
# fp32 allows for TF32-free cuBLAS and kernel reduction order; fp16 keeps 3 more mantissa bits than bf16.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.02, torch.float16: 0.005}
# fairseq-train on the GPU against fp32 on the GPU after the same updates (bits per token).
VALID_LOSS_MARGIN = 0.05


def to_device(memory: LayerMemory, device, dtype) -> LayerMemory:
    return LayerMemory(memory.hidden.to(device, dtype), memory.distance.to(device), memory.valid.to(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("learned", [True, False])
@pytest.mark.parametrize("limit", [None, 20.5])
@pytest.mark.parametrize("kernel", ["fused", "plain"])
def test_every_attention_path_equals_the_reference_on_cuda(dtype, learned, limit, kernel):
    torch.manual_seed(0)
    model = make_model(learned=learned, block=8, max_span=32, ramp=4, init=0.4)
    if learned:
        torch.nn.init.normal_(model.decoder.layers[0].attention.span_predictor.proj.weight, std=1.0)
    model = model.bfloat16()  # weights representable in every dtype tested
    reference = copy.deepcopy(model).double()
    gpu = copy.deepcopy(model).to("cuda", dtype)
    block, memory = attention_inputs(torch.float32)
    slow, _ = reference_attention(
        reference.decoder.layers[0].attention,
        block.double(),
        to_device(memory, "cpu", torch.float64),
        reference.decoder.positions,
        limit,
    )
    slow_grad = torch.autograd.grad(slow.square().sum(), reference.decoder.layers[0].attention.k_proj.weight)[
        0
    ]

    attention = gpu.decoder.layers[0].attention
    attention.kernel = kernel  # the training path: the fused kernels' backward, or the plain one
    x = block.detach().to("cuda", dtype).requires_grad_()
    past = to_device(memory, "cuda", dtype)
    args = (past.distance, past.valid, gpu.decoder.positions, limit)
    out, projected, span_loss, _ = attention(x, attention.project(past.hidden), *args)  # the training path
    grad = torch.autograd.grad(out.float().square().sum(), attention.k_proj.weight)[0]
    with torch.no_grad():  # the fused scaled_dot_product_attention path
        fused, *_ = attention(x, attention.project(past.hidden), *args)
    if learned:
        assert projected.spans.dtype == span_loss.dtype == torch.float32
    for name, value, expected in (
        ("autograd", out, slow),
        ("fused", fused, slow),
        ("k grad", grad, slow_grad),
    ):
        assert torch.isfinite(value).all(), name
        assert relative_error(value.cpu().double(), expected.detach()) < TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_on_cuda_is_finite_with_spans_at_L(dtype):
    torch.manual_seed(0)
    L, R, M = 512, 16, 32
    model = make_model(block=M, layers=2, max_span=L, ramp=R).to("cuda", dtype)
    for layer in model.decoder.layers:
        torch.nn.init.constant_(layer.attention.span_predictor.proj.bias, 30.0)  # e = L
    tokens = torch.randint(4, 12, (4, 24 * M), device="cuda")
    for k in range(0, tokens.size(1), M):
        logits, extra = model(tokens[:, k : k + M], reset_memory=(k == 0))
        (logits.float().logsumexp(-1).mean() + extra["span_loss"]).backward()
        assert torch.isfinite(logits).all() and torch.isfinite(extra["span_loss"])
    assert min(len(memory) for memory in model.decoder.memory()) > L


def test_no_host_sync_inside_the_per_layer_training_forward_and_backward():
    """The layers (attention, span loss, |C_t|) never wait for the GPU; only the memory update after all layers
    reads the number of surviving entries, which sets the memory's size."""
    torch.manual_seed(0)
    model = make_model(block=16, layers=2, max_span=64, ramp=8).cuda().train()
    torch.nn.init.normal_(model.decoder.layers[0].attention.span_predictor.proj.weight, std=1.0)
    tokens = torch.randint(4, 12, (3, 64), device="cuda")
    model(tokens[:, :16], reset_memory=True)  # a memory with padding and per-stream sizes
    model(tokens[:, 16:32])
    x = model.decoder.embed_tokens(tokens[:, 32:48])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = 0
        for layer, memory in zip(model.decoder.layers, model.decoder.memory()):
            out, projected, span_loss, attn_mem = layer(x, memory, model.decoder.positions, 40.5)
            total = total + out.float().square().mean() + span_loss + attn_mem
            x = out
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def gpu_train_command(data, save_dir, *extra, gpus=1, **kwargs):
    command = [a for a in train_command(data, save_dir, *extra, **kwargs) if a != "--cpu"]
    return command + ["--distributed-world-size", gpus, "--no-save"]


def valid_loss(result) -> float:
    return float(json_logs(result.stdout + result.stderr, "valid")[-1]["valid_loss"])


@pytest.mark.slow
def test_fairseq_train_in_bf16_and_fp16_on_one_gpu(data_bin, tmp_path):
    losses = {
        name: valid_loss(run("fairseq-train", *gpu_train_command(data_bin, tmp_path / name, *extra)))
        for name, extra in (("fp32", []), ("bf16", ["--bf16"]), ("fp16", ["--fp16"]), ("amp", ["--amp"]))
    }
    for name in ("bf16", "fp16", "amp"):
        assert losses[name] == pytest.approx(losses["fp32"], abs=VALID_LOSS_MARGIN), losses


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_over_nccl_train_as_one_gpu_with_all_the_streams(data_bin, tmp_path):
    one = run("fairseq-train", *gpu_train_command(data_bin, tmp_path / "one", updates=10, batch=4))
    two = run(
        "fairseq-train",
        *gpu_train_command(
            data_bin,
            tmp_path / "two",
            "--distributed-port",
            free_port(),
            "--ddp-backend",
            "legacy_ddp",
            gpus=2,
            updates=10,
            batch=2,
        ),
    )
    inner = [json_logs(r.stdout + r.stderr, "train_inner") for r in (one, two)]
    assert [record["bsz"] for record in inner[1]] == ["4", "4"]
    for a, b in zip(*inner):
        for key in ("loss", "span_avg", "mem_avg", "attn_mem_avg"):
            assert float(b[key]) == pytest.approx(float(a[key]), abs=2e-3), key
    assert valid_loss(two) == pytest.approx(valid_loss(one), abs=2e-3)
