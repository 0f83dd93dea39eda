"""The mechanism against the paper's equations: masking law, span loss, deletion, bounded memory, baseline."""

import argparse
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY

import fairseq_expire.models.expire_span_lm as lm
import fairseq_expire.modules.expire_span as expire_span
from fairseq_expire.modules.expire_span import (
    LayerMemory,
    RelativePositionTable,
    SpanPredictor,
    _split_flash_attention,
    _whole_bias_attention,
    ramp_span_loss,
)


def soft_mask(remaining, ramp):
    """The paper's ``m = clamp(1 + r / R, 0, 1)``, written as in the paper."""
    return (1 + remaining / ramp).clamp(0, 1)


def make_dictionary(size=12):
    dictionary = Dictionary()
    for i in range(size):
        dictionary.add_symbol(f"w{i}")
    return dictionary


def layer_options(block, layers=1) -> dict:
    """The small layers every memory scheme's unit tests use."""
    return dict(
        tokens_per_sample=block,
        decoder_layers=layers,
        decoder_embed_dim=16,
        decoder_ffn_embed_dim=32,
        decoder_attention_heads=2,
        dropout=0.0,
        attention_dropout=0.0,
    )


def make_model(learned=True, block=8, layers=1, max_span=32, ramp=4, init=0.25, **overrides):
    config_class = lm.ExpireSpanLMConfig if learned else lm.FixedSpanLMConfig
    options = dict(layer_options(block, layers), max_span=max_span)
    if learned:
        options.update(expire_span_ramp=ramp, expire_span_init_percentage=init)
    options.update(overrides)
    model_class = lm.ExpireSpanLanguageModel if learned else lm.FixedSpanLanguageModel
    return model_class.build_model(
        config_class(**options), SimpleNamespace(target_dictionary=make_dictionary())
    )


def run_stream(model, tokens, block):
    """Feed a B x T stream block by block (memory carried across calls); B x T x V logits."""
    outputs = []
    for k in range(0, tokens.size(1), block):
        logits, _ = model(tokens[:, k : k + block], reset_memory=(k == 0))
        outputs.append(logits)
    return torch.cat(outputs, dim=1)


def influence(model, block, length, position, seed=0):
    """Positions t whose output changes when the token at ``position`` changes (1-layer model)."""
    torch.manual_seed(seed)
    tokens = torch.randint(4, 12, (1, length))
    changed = tokens.clone()
    changed[0, position] = 4 + (tokens[0, position] - 4 + 1) % 8
    with torch.no_grad():
        delta = (run_stream(model, tokens, block) - run_stream(model, changed, block)).abs().amax(-1)[0]
    return {t for t in range(length) if t != position and delta[t] > 1e-6}


@pytest.mark.parametrize("position", [0, 5, 13, 22])
def test_masking_law_output_depends_on_token_exactly_within_e_plus_r(position):
    torch.manual_seed(0)
    model = make_model(block=8, max_span=32, ramp=4, init=0.25).eval()  # e = p * L = 8, visible iff d < 12
    e, R = 0.25 * 32, 4
    seen = influence(model, block=8, length=48, position=position)
    expected = {position + d for d in range(1, 48) if d < e + R and position + d < 48}
    assert seen == expected


def test_fixed_span_attends_exactly_the_last_L_positions():
    torch.manual_seed(0)
    model = make_model(learned=False, block=8, max_span=20).eval()
    seen = influence(model, block=8, length=48, position=6)
    assert seen == {6 + d for d in range(1, 21)}


def test_inference_cap_shortens_what_is_seen():
    torch.manual_seed(0)
    model = make_model(block=8, max_span=32, ramp=4, init=0.25, inference_max_span=5).eval()
    assert influence(model, block=8, length=40, position=10) == {10 + d for d in range(1, 9)}  # d < 5 + 4


def dense_ramp_loss(remaining_first, block, ramp):
    """Naive O(M x T) reference: every (query, memory) pair, ``r / R`` where ``0 < m < 1``."""
    t = torch.arange(block, dtype=torch.float32).view(1, block, 1)
    remaining = remaining_first.unsqueeze(1) - t  # B x M x T
    mask = soft_mask(remaining, ramp)
    on_ramp = (mask > 0) & (mask < 1)
    return (remaining * on_ramp).sum(1) / ramp, on_ramp.sum(1)  # B x T, n_i


def test_span_loss_matches_dense_reference_and_its_gradient_is_n_over_R():
    torch.manual_seed(0)
    block, ramp = 16, 8
    spans = (torch.rand(3, 50) * 64).requires_grad_()
    distance = torch.cat([torch.arange(70, 36, -1).float(), -torch.arange(block).float()]).expand(3, -1)
    fast = ramp_span_loss(spans - distance, block, ramp)
    dense, on_ramp_count = dense_ramp_loss(spans - distance, block, ramp)
    assert torch.allclose(fast, dense, atol=1e-4)
    (grad,) = torch.autograd.grad(fast.sum(), spans)
    assert (on_ramp_count > 0).any() and (on_ramp_count == 0).any()
    assert torch.allclose(grad, on_ramp_count.float() / ramp)


def test_span_loss_of_the_layer_equals_the_dense_sum():
    torch.manual_seed(0)
    model = make_model(block=8, layers=1, max_span=32, ramp=4)
    predictor = model.decoder.layers[0].attention.span_predictor
    torch.nn.init.normal_(predictor.proj.weight, std=1.0)  # spans vary per token and stream
    tokens = torch.randint(4, 12, (2, 32))
    memory = None
    for k in range(0, 32, 8):
        memory = model.decoder.memory()
        _, extra = model(tokens[:, k : k + 8], reset_memory=(k == 0))
    keys = torch.cat([memory[0].hidden, model.decoder.embed_tokens(tokens[:, 24:])], 1)
    spans = predictor(keys)  # recomputed from the stored hidden states
    distance_first = torch.cat([memory[0].distance, -torch.arange(8.0).expand(2, -1)], 1)
    valid = torch.cat([memory[0].valid, torch.ones(2, 8, dtype=torch.bool)], 1)
    dense, _ = dense_ramp_loss(spans - distance_first, 8, 4)
    assert torch.allclose(extra["span_loss"], (dense * valid).sum(), atol=1e-4)


def test_span_predictor_gets_gradient_only_through_ramp_mask_and_aux():
    torch.manual_seed(0)
    model = make_model(block=8, max_span=32, ramp=4, init=0.25)
    predictor = model.decoder.layers[0].attention.span_predictor
    tokens = torch.randint(4, 12, (2, 8))
    logits, extra = model(tokens, reset_memory=True)  # first block: e = 8, R = 4, d <= 7: mask is 1, no ramp
    logits.sum().backward(retain_graph=True)
    assert predictor.proj.bias.grad is None or predictor.proj.bias.grad.abs().max() == 0
    extra["span_loss"].backward()
    assert predictor.proj.bias.grad is None or predictor.proj.bias.grad.abs().max() == 0
    model.zero_grad()
    logits, extra = model(tokens)  # second block: memories at distances 9..11 are on the ramp
    logits.sum().backward(retain_graph=True)
    assert predictor.proj.bias.grad.abs().max() > 0
    model.zero_grad()
    extra["span_loss"].backward()
    assert predictor.proj.bias.grad.abs().max() > 0


def keep_everything(memory, block, keys, rule, span_limit=None, cache_projection=False):
    """Reference memory: never delete anything, only append and shift distances (no projection cache)."""
    M = block.size(1)
    return LayerMemory(
        hidden=torch.cat([memory.hidden, block.detach()], 1),
        distance=torch.cat(
            [memory.distance, -torch.arange(M, dtype=torch.float32).expand(block.size(0), -1)], 1
        )
        + M,
        valid=torch.cat([memory.valid, memory.valid.new_ones(block.size(0), M)], 1),
    )


@pytest.mark.parametrize("learned", [True, False])
def test_deleting_memories_never_changes_outputs(monkeypatch, learned):
    torch.manual_seed(0)
    model = make_model(learned=learned, block=8, layers=2, max_span=24, ramp=4, init=0.3).eval()
    if learned:
        for layer in model.decoder.layers:
            torch.nn.init.normal_(
                layer.attention.span_predictor.proj.weight, std=2.0
            )  # spans differ per stream
    tokens = torch.randint(4, 12, (3, 96))
    with torch.no_grad():
        deleting = run_stream(model, tokens, 8)
        kept = [len(memory) for memory in model.decoder.memory()]
        monkeypatch.setattr(lm, "update_memory", keep_everything)
        keeping = run_stream(model, tokens, 8)
    assert max(kept) < 96  # something was deleted
    assert torch.allclose(deleting, keeping, atol=1e-5)


def test_memory_stays_bounded_when_spans_reach_L():
    torch.manual_seed(0)
    L, R, M = 40, 8, 8
    model = make_model(block=M, layers=2, max_span=L, ramp=R)
    for layer in model.decoder.layers:
        torch.nn.init.constant_(layer.attention.span_predictor.proj.bias, 30.0)  # e = L
    tokens = torch.randint(4, 12, (2, 40 * M))
    for k in range(0, tokens.size(1), M):
        logits, extra = model(tokens[:, k : k + M], reset_memory=(k == 0))
        extra["span_loss"].backward()
        assert all(len(memory) <= L + R for memory in model.decoder.memory())
        assert torch.isfinite(logits).all()
    assert extra["span_max"] == pytest.approx(L)


def test_query_with_nothing_to_attend_gives_zeros_not_nan():
    torch.manual_seed(0)
    model = make_model(block=8)
    attention = model.decoder.layers[0].attention
    x = torch.randn(2, 8, 16, requires_grad=True)
    memory = LayerMemory.empty(2, 8, 16, like=x)
    past = attention.project(memory.hidden)
    out, *_ = attention(x, past, memory.distance, memory.valid, model.decoder.positions)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))  # the stream's first query sees nothing
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_batch_size_change_resets_memory_with_a_log_line(caplog):
    model = make_model(block=8)
    model(torch.randint(4, 12, (3, 8)), reset_memory=True)
    with caplog.at_level("INFO"):
        model(torch.randint(4, 12, (2, 8)))
    assert "memory reset" in caplog.text
    assert model.decoder.memory()[0].hidden.size(0) == 2


def test_training_and_evaluation_memories_are_separate():
    model = make_model(block=8)
    model.train()
    model(torch.randint(4, 12, (2, 8)), reset_memory=True)
    model(torch.randint(4, 12, (2, 8)))
    train_memory = model.decoder.memory()
    model.eval()
    model(torch.randint(4, 12, (2, 8)), reset_memory=True)
    model.train()
    assert model.decoder.memory() is train_memory
    assert "_memory" not in dict(model.named_buffers()) and not any("memory" in k for k in model.state_dict())


def preset_args(arch, **extra):
    args = argparse.Namespace(
        arch=arch,
        task="language_modeling_with_memory",
        criterion="expire_span_cross_entropy",
        batch_size=8,
        **extra,
    )
    ARCH_CONFIG_REGISTRY[arch](args)
    return args


@pytest.mark.parametrize(
    "arch",
    [
        "expire_span_lm_enwik8",
        "expire_span_lm_enwik8_small",
        "expire_span_lm_pg19",
        "expire_span_lm_collision",
        "expire_span_lm_wt103",
        "expire_span_lm_tiny",
        "fixed_span_lm_enwik8",
        "fixed_span_lm_tiny",
    ],
)
def test_every_preset_builds(arch):
    args = preset_args(arch)
    learned = arch.startswith("expire")
    config_class = lm.ExpireSpanLMConfig if learned else lm.FixedSpanLMConfig
    fields = {k: v for k, v in vars(args).items() if k in config_class.__dataclass_fields__}
    config = config_class(**{**fields, "tokens_per_sample": 16})
    vocabulary = 70000 if arch.endswith("wt103") else 256
    with torch.device("meta"):
        decoder = lm.ExpireSpanDecoder(config, make_dictionary(vocabulary - 4), learned)
    parameters = sum(p.numel() for p in decoder.parameters())
    assert parameters > 0
    if arch == "expire_span_lm_enwik8":
        assert 37e6 < parameters < 39e6  # paper Table 2: 38M
    if arch == "expire_span_lm_collision":
        assert args.decoder_normalize_before and args.expire_span_init_percentage == 0.01


@pytest.mark.parametrize("learned", [True, False])
@pytest.mark.parametrize("pre_norm", [True, False])
def test_cached_evaluation_projections_match_the_plain_path(learned, pre_norm):
    torch.manual_seed(0)
    model = make_model(
        learned=learned, block=8, layers=2, max_span=24, decoder_normalize_before=pre_norm
    ).eval()
    if learned:
        for layer in model.decoder.layers:
            torch.nn.init.normal_(layer.attention.span_predictor.proj.weight, std=2.0)
    tokens = torch.randint(4, 12, (3, 96))
    with torch.no_grad():
        cached = run_stream(model, tokens, 8)
        assert model.decoder.memory()[0].projection is not None
        model.decoder.cache_projections_in_eval = False
        plain = run_stream(model, tokens, 8)
        assert model.decoder.memory()[0].projection is None
    assert torch.allclose(cached, plain, atol=1e-5)


def reference_attention(attention, block, memory, positions, span_limit=None, mask_of_distance=None):
    """The paper's formula written out densely: a' = m exp(s) / sum_j m exp(s_j), s = q.(k + p_{t-i}) / sqrt(D).
    ``mask_of_distance``: another mask law, from the distance t - i (B x M x T) to m (B x K x M x T)."""
    B, M, H = block.shape
    K, D = attention.num_heads, attention.head_dim
    keys_in = torch.cat([memory.hidden, block], 1)
    T = keys_in.size(1)
    t = torch.arange(M, dtype=torch.float32).view(1, M, 1)
    first = torch.cat([memory.distance, -torch.arange(M, dtype=torch.float32).expand(B, -1)], 1)
    d = first.unsqueeze(1) + t  # B x M x T
    valid = torch.cat([memory.valid, torch.ones(B, M, dtype=torch.bool)], 1).unsqueeze(1)
    if mask_of_distance is not None:
        m = mask_of_distance(d)
    elif attention.rule.learned:
        e = attention.span_predictor(keys_in)
        e = e if span_limit is None else e.clamp(max=span_limit)
        m = soft_mask(e.unsqueeze(1) - d, attention.rule.ramp)
    else:
        m = (d <= min(attention.rule.max_span, span_limit or math.inf)).float()
    m = (m if m.dim() == 4 else m.unsqueeze(1)) * ((d >= 1) * valid).unsqueeze(1)  # B x K' x M x T
    q = attention.q_proj(block).view(B, M, K, D).transpose(1, 2)
    k = attention.k_proj(keys_in).view(B, T, K, D).transpose(1, 2)
    v = attention.v_proj(keys_in).view(B, T, K, D).transpose(1, 2)
    s = q @ k.transpose(-1, -2)  # B x K x M x T
    p = positions.weight.t()  # M x D, row d-1
    for ti in range(M):
        for j in range(T):
            dist = int(d[0, ti, j])  # same for every stream in this test
            if 1 <= dist <= M and j >= T - 2 * M:
                s[:, :, ti, j] = s[:, :, ti, j] + q[:, :, ti] @ p[dist - 1]
    s = s / math.sqrt(D)
    weights = m * torch.exp(s - s.amax(-1, keepdim=True))
    total = weights.sum(-1, keepdim=True)
    a = torch.where(total > 0, weights / total.clamp(min=1e-30), torch.zeros_like(weights))
    out = (a @ v).transpose(1, 2).reshape(B, M, H)
    return attention.out_proj(out), (m > 0).sum(-1).float().mean()


@pytest.mark.parametrize("mask_heads", [1, 3], ids=["shared-mask", "mask-per-head"])
def test_split_cpu_attention_equals_one_call_with_the_whole_bias(mask_heads):
    """The CPU path merges two kernel calls by their log-sum-exps; a part a row sees nothing of must not count."""
    torch.manual_seed(0)
    B, K, M, N, D = 2, 3, 4, 7, 5
    T = N + M
    positions = RelativePositionTable(D, M)
    q, k, v = torch.randn(B, K, M, D), torch.randn(B, K, T, D), torch.randn(B, K, T, D)
    log_mask = torch.rand(B, mask_heads, M, T).log()
    log_mask[0, :, 1, : T - 2 * M] = -math.inf  # sees only the last 2M keys
    log_mask[1, -1, 2, T - 2 * M :] = -math.inf  # sees only the older memories
    with torch.no_grad():
        split, _ = _split_flash_attention(q, k, v, log_mask, positions, 0.0)
        whole = _whole_bias_attention(q, k, v, log_mask, positions, 0.0)
    assert torch.allclose(split, whole, atol=1e-6)


@pytest.mark.parametrize("learned", [True, False])
def test_attention_matches_the_dense_paper_formula_in_values_and_gradients(learned):
    torch.manual_seed(0)
    model = make_model(learned=learned, block=6, max_span=10, ramp=3, init=0.4)
    attention, positions = model.decoder.layers[0].attention, model.decoder.positions
    if learned:
        torch.nn.init.normal_(attention.span_predictor.proj.weight, std=1.0)
    B, M, N, H = 2, 6, 9, 16
    memory = LayerMemory(
        hidden=torch.randn(B, N, H),
        distance=torch.arange(N, 0, -1, dtype=torch.float32).expand(B, -1),
        valid=torch.rand(B, N) > 0.3,  # padding
    )
    block = torch.randn(B, M, H, requires_grad=True)
    for limit in (None, 4.5):
        fast, _, _, attn_mem = attention(
            block, attention.project(memory.hidden), memory.distance, memory.valid, positions, limit
        )
        fast_grads = torch.autograd.grad(fast.square().sum(), [block, *model.parameters()], allow_unused=True)
        slow, slow_attn_mem = reference_attention(attention, block, memory, positions, limit)
        slow_grads = torch.autograd.grad(slow.square().sum(), [block, *model.parameters()], allow_unused=True)
        assert torch.allclose(fast, slow, atol=1e-5)
        assert attn_mem == pytest.approx(float(slow_attn_mem))
        with torch.no_grad():  # the fused scaled_dot_product_attention path
            fused, *_ = attention(
                block, attention.project(memory.hidden), memory.distance, memory.valid, positions, limit
            )
        assert torch.allclose(fused, slow, atol=1e-5)
        for a, b in zip(fast_grads, slow_grads):
            assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("block", [1 << 22, 1], ids=["whole", "a_stream_at_a_time"])
def test_span_predictor_is_the_formula_in_values_and_gradients(block, monkeypatch):
    """``e = L sigmoid(w . (h / pre_div) + b)`` and its gradients on h, w and b, against autograd through the
    formula, also with the weight's gradient summed one stream at a time."""
    monkeypatch.setattr(expire_span, "BACKWARD_BLOCK_ELEMENTS", block)
    torch.manual_seed(0)
    predictor = SpanPredictor(16, max_span=64, init_percentage=0.3, pre_div=2.0)
    torch.nn.init.normal_(predictor.proj.weight)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    weight = torch.randn(3, 7)
    parameters = [hidden, predictor.proj.weight, predictor.proj.bias]
    spans = predictor(hidden)
    formula = 64 * torch.sigmoid(hidden @ (predictor.proj.weight / 2.0).t() + predictor.proj.bias).squeeze(-1)
    assert torch.allclose(spans, formula)
    for a, b in zip(
        torch.autograd.grad((spans * weight).sum(), parameters),
        torch.autograd.grad((formula * weight).sum(), parameters),
    ):
        assert torch.allclose(a, b, atol=1e-5)


def kernel_inputs(B=3, M=4, N=20, H=16, seed=0):
    """A block and a memory reaching well beyond the last 2M keys, with padding; the last stream's memory is all
    padding, so its first query sees nothing."""
    generator = torch.Generator().manual_seed(seed)
    block = torch.randn(B, M, H, generator=generator).requires_grad_()
    valid = torch.rand(B, N, generator=generator) > 0.3
    valid[-1] = False
    memory = LayerMemory(
        hidden=torch.randn(B, N, H, generator=generator),
        distance=torch.arange(N, 0, -1, dtype=torch.float32).expand(B, -1),
        valid=valid,
    )
    return block, memory


def compare_kernels(model, block, memory, limit=None, mask_of_distance=None, atol=1e-5):
    """Training attention through the fused kernels against the plain path and the dense paper formula: the
    outputs and the gradients of the block and of every parameter (q, k, v, out, the spans, the position
    table)."""
    attention, positions = model.decoder.layers[0].attention, model.decoder.positions
    parameters = [block, *model.parameters()]
    names = ["block", *dict(model.named_parameters())]
    weight = torch.randn(block.shape, generator=torch.Generator().manual_seed(1))
    results = {}
    # "kept": keys and values without what they were projected from, so the fused backward keeps them
    for kernel, keep in (("fused", False), ("kept", True), ("plain", False)):
        attention.kernel = "plain" if kernel == "plain" else "fused"
        assert (attention._plain_reason(block) is None) == (kernel != "plain")
        past = attention.project(memory.hidden)
        past = dataclasses.replace(past, source=None) if keep else past
        out, *_ = attention(block, past, memory.distance, memory.valid, positions, limit)
        results[kernel] = out, torch.autograd.grad((out * weight).sum(), parameters, allow_unused=True)
    slow, _ = reference_attention(attention, block, memory, positions, limit, mask_of_distance)
    results["paper"] = slow, torch.autograd.grad((slow * weight).sum(), parameters, allow_unused=True)
    fused, fused_grads = results["fused"]
    assert torch.equal(fused[-1, 0], torch.zeros_like(fused[-1, 0]))  # a row that sees nothing
    for other in ("kept", "plain", "paper"):
        out, grads = results[other]
        assert torch.allclose(fused, out, atol=atol), other
        for name, a, b in zip(names, fused_grads, grads):
            a = torch.zeros_like(b) if a is None and b is not None else a
            b = torch.zeros_like(a) if b is None and a is not None else b
            assert (a is None and b is None) or torch.allclose(a, b, atol=atol), (other, name)
    return dict(zip(names, fused_grads))


def older_keys_on_the_ramp(spans, memory, block, ramp):
    """Whether some valid memory older than the last 2M keys is on the ramp (0 < m < 1) for a query."""
    M = block.size(1)
    t = torch.arange(M, dtype=torch.float32).view(1, M, 1)
    remaining = (spans - memory.distance).unsqueeze(1) - t  # B x M x N
    on_ramp = ((remaining > -ramp) & (remaining < 0)).any(1) & memory.valid  # B x N
    return bool(on_ramp[:, :-M].any())


@pytest.mark.parametrize("limit", [None, 6.5])
@pytest.mark.parametrize("score_block", [1 << 22, 1], ids=["whole", "a_stream_a_head_and_a_key_at_a_time"])
def test_fused_training_attention_equals_the_plain_path_and_the_paper_formula(
    limit, score_block, monkeypatch
):
    """Also with the backward's recomputed scores bounded to one stream (last 2M keys) and one key (older keys
    on the ramp) at a time."""
    monkeypatch.setattr(expire_span, "BACKWARD_BLOCK_ELEMENTS", score_block)
    torch.manual_seed(0)
    model = make_model(block=4, max_span=16, ramp=4, init=0.5)
    attention = model.decoder.layers[0].attention
    torch.nn.init.normal_(attention.span_predictor.proj.weight, std=1.0)  # spans differ per key
    block, memory = kernel_inputs()
    spans = attention.span_predictor(memory.hidden)
    assert older_keys_on_the_ramp(spans if limit is None else spans.clamp(max=limit), memory, block, 4)
    grads = compare_kernels(model, block, memory, limit)
    assert grads["decoder.layers.0.attention.span_predictor.proj.weight"].abs().max() > 0
    assert grads["decoder.positions.weight"].abs().max() > 0


@pytest.mark.parametrize("limit", [None, 7])
def test_fused_training_attention_with_a_fixed_span_equals_the_plain_path_and_the_paper_formula(limit):
    torch.manual_seed(0)
    model = make_model(learned=False, block=4, max_span=10)
    compare_kernels(model, *kernel_inputs(), limit)


def test_fused_training_attention_of_the_first_block_equals_the_plain_path():
    """A stream's first block: the memory is M placeholders, no key older than the last 2M."""
    torch.manual_seed(0)
    model = make_model(block=4, max_span=16, ramp=4, init=0.5)
    block = torch.randn(2, 4, 16, requires_grad=True)
    compare_kernels(model, block, LayerMemory.empty(2, 4, 16, like=block))


def test_fused_backward_gives_the_keys_and_values_gradients_in_their_own_layout(monkeypatch):
    """k and v are heads of B x T x H (a transposed view): their gradients come back with k's strides, so that
    autograd's way back to B x T x H is a view, not a copy of every key."""
    torch.manual_seed(0)
    model = make_model(block=4, max_span=16, ramp=4, init=0.5)
    attention = model.decoder.layers[0].attention
    block, memory = kernel_inputs()
    layouts = []
    heads = attention._heads

    def recorded(x):
        view = heads(x)
        if view.requires_grad:
            view.register_hook(lambda grad: layouts.append((view.shape, view.stride(), grad.stride())))
        return view

    monkeypatch.setattr(attention, "_heads", recorded)
    out, *_ = attention(
        block, attention.project(memory.hidden), memory.distance, memory.valid, model.decoder.positions
    )
    out.sum().backward()
    T = memory.hidden.size(1) + block.size(1)
    keys = [(view, grad) for shape, view, grad in layouts if shape[2] == T]
    assert len(keys) == 2 and all(view == grad for view, grad in keys)


def test_attention_dropout_trains_through_the_plain_path_with_the_reason_logged_once(caplog):
    model = make_model(block=4, attention_dropout=0.1).train()
    attention = model.decoder.layers[0].attention
    block, memory = kernel_inputs()
    with caplog.at_level("INFO"):
        for _ in range(2):
            attention(
                block,
                attention.project(memory.hidden),
                memory.distance,
                memory.valid,
                model.decoder.positions,
            )
    assert caplog.text.count("attention dropout 0.1") == 1 and "plain path" in caplog.text
    assert make_model(attention_kernel="plain").decoder.layers[0].attention.kernel == "plain"
