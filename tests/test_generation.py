"""Token-by-token decoding (generation) against block processing, and its memory bound."""

from types import SimpleNamespace

import pytest
import torch
from test_adaptive_span import make_adaptive
from test_compressive import make_compressive
from test_expire_span import layer_options, make_dictionary, make_model, run_stream

import fairseq_expire.models.expire_span_lm as lm
from fairseq_expire.errors import UsageError
from fairseq_expire.generate import GenerateConfig, generate
from fairseq_expire.models.expire_span_lm import DecodingState


def varied_spans(model, seed=0):
    """Spans that differ from token to token (a fresh model's are all p * L), so that expiry is tested."""
    torch.manual_seed(seed)
    for layer in model.decoder.layers:
        predictor = layer.attention.span_predictor
        if predictor is not None:
            predictor.proj.weight.data.normal_(0, 1.0)
    return model


def log_probs(model, logits):
    return model.get_normalized_probs((logits, None), log_probs=True)


def read_in_pieces(model, tokens, prompt):
    """The prompt at once (whole blocks in block processing, the rest token by token), then one token a call."""
    state = DecodingState()
    with torch.no_grad():
        features = [model.decoder.read(tokens[:, :prompt], state)[0]]
        features += [
            model.decoder.read(tokens[:, i : i + 1], state)[0] for i in range(prompt, tokens.size(1))
        ]
    return model.decoder.output_layer(torch.cat(features, dim=1)), state


def steps_equal_blocks(model, prompt: int) -> DecodingState:
    """Two streams of 48 tokens read token by token after a prompt of ``prompt`` tokens give the log-probs of
    block processing (blocks of 8), to 1e-5 (fp32; the two paths use different attention kernels)."""
    torch.manual_seed(1)
    tokens = torch.randint(4, 12, (2, 48))
    with torch.no_grad():
        blocks = log_probs(model, run_stream(model, tokens, block=8))
    steps, state = read_in_pieces(model, tokens, prompt)
    torch.testing.assert_close(log_probs(model, steps), blocks, atol=1e-5, rtol=0)
    return state


CASES = {
    "expire_span": dict(learned=True, layers=2),
    "expire_span_pre_norm": dict(learned=True, layers=2, decoder_normalize_before=True),
    "expire_span_inference_cap": dict(learned=True, layers=2, inference_max_span=6),
    "fixed_span": dict(learned=False, layers=2, max_span=12),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("prompt", [0, 5, 16, 21])
def test_token_by_token_log_probs_equal_block_processing(case, prompt):
    model = varied_spans(make_model(block=8, ramp=4, **{"max_span": 32, **CASES[case]})).eval()
    assert steps_equal_blocks(model, prompt).length == 48


@pytest.mark.parametrize("prompt", [0, 5, 16])
@pytest.mark.parametrize("inference_max_span", [None, 9])
def test_adaptive_span_token_by_token_log_probs_equal_block_processing(prompt, inference_max_span):
    """Each head keeps its own span z_k when tokens come one at a time (spans 5.5 and 12.3: on the ramp)."""
    model = make_adaptive(
        fractions=[0.275, 0.615],
        block=8,
        layers=2,
        max_span=20,
        ramp=3,
        inference_max_span=inference_max_span,
    ).eval()
    state = steps_equal_blocks(model, prompt)
    assert max(state.mem_per_layer()) <= 12.3 + 3  # the memory follows the largest head span


def test_compressive_refuses_token_by_token_decoding_in_one_line():
    model = make_compressive().eval()
    with pytest.raises(UsageError, match="compressive_lm has no token-by-token decoding"):
        read_in_pieces(model, torch.randint(4, 12, (1, 6)), prompt=4)


def test_beam_reordering_gives_each_hypothesis_its_memory():
    model = varied_spans(make_model(block=8, layers=2)).eval()
    torch.manual_seed(2)
    tokens = torch.randint(4, 12, (3, 32))
    incremental_state = {}
    with torch.no_grad():
        for step in range(20):
            model.decoder(tokens[:, : step + 1], incremental_state=incremental_state)
        order = torch.tensor([2, 2, 0])
        model.decoder.reorder_incremental_state_scripting(incremental_state, order)
        reordered = tokens[order]
        continued = [
            model.decoder(reordered[:, : step + 1], incremental_state=incremental_state)[0]
            for step in range(20, 30)
        ]
        expected = run_stream(model, reordered, block=8)[:, 20:30]
    torch.testing.assert_close(torch.cat(continued, 1), expected, atol=1e-5, rtol=0)


def resident_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.parametrize("learned", [True, False])
def test_memory_stays_within_l_plus_r_and_rss_flat_however_long_the_generation(learned):
    """3,000 tokens here (scripts/generate.py ran 100K, README); the bound holds from the first step on."""
    L, R = 16, 4
    model = varied_spans(make_model(learned=learned, block=8, max_span=L, ramp=R, init=0.5)).eval()
    torch.manual_seed(3)
    tokens = torch.randint(4, 12, (2, 3000))
    state, largest = DecodingState(), 0
    with torch.no_grad():
        model.decoder.read(tokens[:, :20], state)
        for i in range(20, tokens.size(1)):
            model.decoder.read(tokens[:, i : i + 1], state)
            largest = max(largest, max(len(memory) for memory in state.memories))
            if i == 1000:
                before = resident_mb()
    assert largest <= L + R - 1 if learned else largest == L
    assert resident_mb() - before < 2.0


def test_sampling_never_draws_padding_or_the_symbols_that_fill_the_dictionary():
    """fairseq pads a dictionary to a multiple of 8 with madeupwordNNNN symbols that no data contains."""
    dictionary = make_dictionary(10)  # 4 specials + 10 symbols, padded to 16 by two madeupwords
    dictionary.pad_to_multiple_(8)
    fillers = [i for i, symbol in enumerate(dictionary.symbols) if symbol.startswith("madeupword")]
    config = lm.ExpireSpanLMConfig(**layer_options(8), max_span=32, expire_span_ramp=4)
    model = lm.ExpireSpanLanguageModel.build_model(
        config, SimpleNamespace(target_dictionary=dictionary)
    ).eval()
    with torch.no_grad():  # make the never-seen symbols by far the most likely
        model.decoder.output_projection.bias[[dictionary.pad(), dictionary.bos(), *fillers]] = 50.0
    drawn = []
    settings = GenerateConfig(max_tokens=200, seed=0)
    generate(model, torch.tensor([dictionary.eos()]), settings, drawn.append)
    assert len(fillers) == 2 and len(drawn) == 200
    assert not {dictionary.pad(), dictionary.bos(), *fillers} & set(drawn)
