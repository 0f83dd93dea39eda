"""adaptive_span_lm against Adaptive-Span's equations: the mask m_z(x) = clamp((R + z - x) / R, 0, 1) per head and
its gradient, spans kept in [0, L], the L1 loss, and a memory trimmed to the largest span without changing
outputs."""

from types import SimpleNamespace

import pytest
import torch
from fairseq.models import ARCH_MODEL_REGISTRY
from test_expire_span import (
    compare_kernels,
    keep_everything,
    kernel_inputs,
    layer_options,
    make_dictionary,
    preset_args,
    reference_attention,
    run_stream,
)

import fairseq_expire.models.expire_span_lm as lm
from fairseq_expire.criterions.expire_span_cross_entropy import ExpireSpanCrossEntropyCriterion
from fairseq_expire.errors import UsageError
from fairseq_expire.models.adaptive_span_lm import AdaptiveSpanLanguageModel, AdaptiveSpanLMConfig
from fairseq_expire.modules import expire_span
from fairseq_expire.modules.expire_span import LayerMemory


def adaptive_config(block=6, layers=1, max_span=20, ramp=3, init=0.0, **overrides):
    options = dict(
        layer_options(block, layers), max_span=max_span, adaptive_span_ramp=ramp, adaptive_span_init=init
    )
    return AdaptiveSpanLMConfig(**{**options, **overrides})


def make_adaptive(fractions=None, **options):
    """The model as fairseq-train builds it; ``fractions``: every layer's z / L per head."""
    model = AdaptiveSpanLanguageModel.build_model(
        adaptive_config(**options), SimpleNamespace(target_dictionary=make_dictionary())
    )
    if fractions is not None:
        for layer in model.decoder.layers:
            layer.attention.span_predictor.fraction.data.copy_(torch.tensor(fractions))
    return model


def dense_adaptive_mask(z, ramp):
    """m_z(x) = clamp((R + z - x) / R, 0, 1), written as in the Adaptive-Span paper: B x M x T -> B x K x M x T."""
    return lambda x: ((ramp + z.view(1, -1, 1, 1) - x.unsqueeze(1)) / ramp).clamp(0, 1)


@pytest.mark.parametrize("limit", [None, 7.5])
def test_adaptive_mask_law_and_its_gradient_match_the_dense_formula(limit):
    torch.manual_seed(0)
    L, R, M, N, H = 20, 3, 6, 9, 16
    model = make_adaptive(fractions=[0.275, 0.615], block=M, max_span=L, ramp=R)  # z = 5.5, 12.3: on the ramp
    attention, positions = model.decoder.layers[0].attention, model.decoder.positions
    fraction = attention.span_predictor.fraction
    memory = LayerMemory(
        hidden=torch.randn(2, N, H),
        distance=torch.arange(N, 0, -1, dtype=torch.float32).expand(2, -1),
        valid=torch.rand(2, N) > 0.3,  # padding
    )
    block = torch.randn(2, M, H, requires_grad=True)
    parameters = [block, *model.parameters()]
    fast, _, _, attn_mem = attention(
        block, attention.project(memory.hidden), memory.distance, memory.valid, positions, limit
    )
    fast_grads = torch.autograd.grad(fast.square().sum(), parameters, allow_unused=True)
    z = attention.span_predictor.spans()
    z = z if limit is None else z.clamp(max=limit)
    slow, slow_attn_mem = reference_attention(
        attention, block, memory, positions, mask_of_distance=dense_adaptive_mask(z, R)
    )
    slow_grads = torch.autograd.grad(slow.square().sum(), parameters, allow_unused=True)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert float(attn_mem) == pytest.approx(float(slow_attn_mem))  # |C_t|, mean over heads
    for name, a, b in zip(["block", *dict(model.named_parameters())], fast_grads, slow_grads):
        if b is None:
            assert a is None or not a.any(), name
        else:
            assert torch.allclose(a, b, atol=1e-5), name
    grad_z = fast_grads[[p is fraction for p in parameters].index(True)]
    assert (grad_z != 0).all() if limit is None else grad_z[1] == 0  # a capped span gets no gradient
    with torch.no_grad():  # the fused kernels' path
        fused, *_ = attention(
            block, attention.project(memory.hidden), memory.distance, memory.valid, positions, limit
        )
    assert torch.allclose(fused, slow, atol=1e-5)


@pytest.mark.parametrize("limit", [None, 7.5])
@pytest.mark.parametrize("score_block", [1 << 22, 1], ids=["whole", "a_stream_a_head_and_a_key_at_a_time"])
def test_fused_training_attention_with_a_mask_per_head_equals_the_plain_path_and_the_paper_formula(
    limit, score_block, monkeypatch
):
    """Also with the backward's recomputed scores bounded to one head of one stream (:data:`BACKWARD_BLOCK_ELEMENTS`)."""
    monkeypatch.setattr(expire_span, "BACKWARD_BLOCK_ELEMENTS", score_block)
    torch.manual_seed(0)
    L, R = 20, 3
    # z = 6.2, 13.6: older keys on the ramp
    model = make_adaptive(fractions=[0.31, 0.68], block=4, max_span=L, ramp=R)
    z = model.decoder.layers[0].attention.span_predictor.spans()
    z = z if limit is None else z.clamp(max=limit)
    grads = compare_kernels(model, *kernel_inputs(), limit, mask_of_distance=dense_adaptive_mask(z, R))
    grad_z = grads["decoder.layers.0.attention.span_predictor.fraction"]
    assert (grad_z != 0).all() if limit is None else grad_z[1] == 0


def test_adaptive_memory_is_trimmed_to_the_largest_head_span_and_outputs_do_not_change(monkeypatch):
    torch.manual_seed(0)
    L, R, M = 40, 4, 8
    model = make_adaptive(fractions=[0.2, 0.5], block=M, layers=2, max_span=L, ramp=R).eval()  # z = 8, 20
    tokens = torch.randint(4, 12, (3, 12 * M))
    with torch.no_grad():
        trimmed = run_stream(model, tokens, M)
        # memory i is kept iff max z + R > its distance to the next block: distances 1..23
        assert [len(memory) for memory in model.decoder.memory()] == [23, 23]
        _, extra = model(tokens[:, :M])
        assert extra["mem_per_layer"].tolist() == [23, 23]
        assert extra["span_max"] == pytest.approx(20)
        monkeypatch.setattr(lm, "update_memory", keep_everything)
        kept = run_stream(model, tokens, M)
    assert torch.allclose(trimmed, kept, atol=1e-5)


def test_adaptive_memory_stays_bounded_by_L_plus_R_when_spans_reach_L():
    L, R, M = 24, 4, 8
    model = make_adaptive(fractions=[1.0, 1.0], block=M, layers=2, max_span=L, ramp=R)
    tokens = torch.randint(4, 12, (2, 10 * M))
    for k in range(0, tokens.size(1), M):
        logits, extra = model(tokens[:, k : k + M], reset_memory=(k == 0))
        (logits.sum() + extra["adaptive_span_loss"]).backward()
        assert all(len(memory) <= L + R for memory in model.decoder.memory())
    assert extra["mem_per_layer"].tolist() == [L + R - 1] * 2


def test_adaptive_spans_are_kept_in_0_L_and_their_l1_loss_is_the_mean_over_heads_summed_over_layers():
    L = 20
    model = make_adaptive(fractions=[-0.5, 0.25], layers=2, max_span=L).train()
    _, extra = model(torch.randint(4, 12, (2, 6)))
    assert extra["head_spans"].tolist() == [[0.0, 5.0], [0.0, 5.0]]  # projected before use
    assert float(extra["adaptive_span_loss"]) == pytest.approx(2 * 2.5)
    extra["adaptive_span_loss"].backward()
    for layer in model.decoder.layers:
        assert layer.attention.span_predictor.fraction.grad.tolist() == [L / 2, L / 2]  # d(mean z)/df = L / K


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("adaptive_span_ramp", 0, "--adaptive-span-ramp 0: must be an integer >= 1"),
        ("adaptive_span_init", 1.5, "--adaptive-span-init 1.5: must be in [0, 1]"),
        ("max_span", 4, "--tokens-per-sample 6 is longer than --max-span 4"),
    ],
)
def test_adaptive_span_bad_values_are_refused_with_one_line(option, value, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_adaptive(**{option: value})


def test_a_negative_adaptive_span_loss_is_refused():
    with pytest.raises(UsageError, match=r"--adaptive-span-loss -1.0: must be >= 0"):
        ExpireSpanCrossEntropyCriterion(
            SimpleNamespace(target_dictionary=make_dictionary()), adaptive_span_loss=-1.0
        )


@pytest.mark.parametrize(
    "arch",
    ["adaptive_span_lm_enwik8", "adaptive_span_lm_tiny", "compressive_lm_enwik8", "compressive_lm_tiny"],
)
def test_every_baseline_preset_builds_and_the_enwik8_ones_have_the_expire_span_model_size(arch):
    """Paper 5.1: the same Transformer-XL under every memory scheme, so the enwik8 presets have its 38M params."""
    args = preset_args(arch)
    model_class = ARCH_MODEL_REGISTRY[arch]
    config_class = model_class.__dataclass
    config = config_class(**{k: v for k, v in vars(args).items() if k in config_class.__dataclass_fields__})
    config.tokens_per_sample = 512 if arch.endswith("enwik8") else 16
    with torch.device("meta"):
        model = model_class.build_model(config, SimpleNamespace(target_dictionary=make_dictionary(252)))
    parameters = sum(p.numel() for p in model.parameters())
    if arch.endswith("enwik8"):
        assert 37e6 < parameters < 39e6


def test_evaluation_reads_spans_saved_outside_0_L_as_clamped():
    model = make_adaptive(fractions=[-0.5, 1.5], max_span=20).eval()
    _, extra = model(torch.randint(4, 12, (2, 6)))
    assert extra["head_spans"].tolist() == [[0.0, 20.0]]
