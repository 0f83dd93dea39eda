"""compressive_lm against the Compressive Transformer (mean pooling): which positions each compressed memory
averages, in which order, per stream and across blocks; a bounded memory that is all attended."""

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_expire_span import layer_options, make_dictionary, run_stream

from fairseq_expire.analysis.runner import AnalysisError, LoadedModel
from fairseq_expire.errors import UsageError
from fairseq_expire.models.compressive_lm import CompressiveLanguageModel, CompressiveLMConfig
from fairseq_expire.modules.compressive import compress_memory
from fairseq_expire.modules.expire_span import LayerMemory


def make_compressive(block=4, mem_size=8, cmem_size=3, rate=2, **overrides):
    options = dict(
        layer_options(block, layers=2), mem_size=mem_size, cmem_size=cmem_size, compression_rate=rate
    )
    cfg = CompressiveLMConfig(**{**options, **overrides})
    return CompressiveLanguageModel.build_model(cfg, SimpleNamespace(target_dictionary=make_dictionary()))


def expected_memory(seen, M, n_mem, n_cmem, c):
    """(position or mean position, valid) of every entry, oldest first, after ``seen`` positions; a stream starts
    with M placeholder positions -M..-1 (the empty "previous block")."""
    positions = list(range(-M, seen))
    raw, evicted = positions[-n_mem:], positions[:-n_mem]
    groups = [evicted[g : g + c] for g in range(0, len(evicted), c)]
    groups = groups[-n_cmem:] if n_cmem else []
    entries = [(sum(group) / c, group[0] >= 0) for group in groups]
    return entries + [(p, p >= 0) for p in raw]


@pytest.mark.parametrize("n_cmem", [3, 0])
def test_compressed_memory_holds_the_mean_of_the_right_positions_in_order_across_blocks_and_streams(n_cmem):
    B, M, H, n_mem, c = 3, 4, 2, 8, 2
    memory = LayerMemory.empty(B, M, H, like=torch.zeros(()))
    for blocks in range(1, 9):
        start = (blocks - 1) * M
        # every stream's position p holds 1000 * stream + p (in every dimension)
        block = (torch.arange(B).view(B, 1, 1) * 1000 + torch.arange(start, start + M).view(1, M, 1)).float()
        memory = compress_memory(memory, block.expand(B, M, H), n_mem, n_cmem, c)
        expected = expected_memory(blocks * M, M, n_mem, n_cmem, c)
        assert len(memory) == len(expected) <= n_mem + n_cmem
        values = torch.tensor([value for value, _ in expected])
        valid = torch.tensor([ok for _, ok in expected])
        assert torch.equal(memory.valid, valid.expand(B, -1))
        for b in range(B):
            assert torch.equal(
                memory.hidden[b, valid], (1000 * b + values[valid]).unsqueeze(-1).expand(-1, H)
            )
        # distance to the next block's first query
        assert torch.equal(memory.distance[:, valid], (blocks * M - values[valid]).expand(B, -1))


def test_compressive_memory_stays_bounded_and_is_all_attended():
    torch.manual_seed(0)
    M, n_mem, n_cmem = 4, 8, 3
    model = make_compressive(block=M, mem_size=n_mem, cmem_size=n_cmem, rate=2)
    tokens = torch.randint(4, 12, (2, 12 * M))
    for k in range(0, tokens.size(1), M):
        logits, extra = model(tokens[:, k : k + M], reset_memory=(k == 0))
        logits.sum().backward()
        assert all(len(memory) <= n_mem + n_cmem for memory in model.decoder.memory())
    assert extra["mem_per_layer"].tolist() == [n_mem + n_cmem] * 2
    # |C_t|: every query sees every entry before the block, and the block's earlier positions
    assert float(extra["attn_mem_avg"]) == pytest.approx(n_mem + n_cmem + (M - 1) / 2)


def test_the_oldest_compressed_memory_reaches_the_output():
    torch.manual_seed(0)
    model = make_compressive().eval()
    tokens = torch.randint(4, 12, (1, 12 * 4))
    with torch.no_grad():
        run_stream(model, tokens[:, :-4], 4)
        memories = model.decoder.memory()
        assert memories[0].valid[0, 0]  # the oldest entry, compressed
        reference, _ = model(tokens[:, -4:])
        hidden = memories[0].hidden.clone()
        hidden[0, 0] += 1.0
        model.decoder.set_memory([dataclasses.replace(memories[0], hidden=hidden), *memories[1:]])
        changed, _ = model(tokens[:, -4:])
    assert not torch.allclose(reference, changed)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mem_size=2), "--mem-size 2 is shorter than --tokens-per-sample 4"),
        (dict(rate=3), "--compression-rate 3 must divide --tokens-per-sample 4 and --mem-size 8"),
        (dict(rate=0), "--compression-rate 0: must be an integer >= 1"),
        (dict(cmem_size=-1), "--cmem-size -1: must be an integer >= 0"),
    ],
)
def test_compressive_bad_values_are_refused_with_one_line(overrides, message):
    with pytest.raises(UsageError, match=message):
        make_compressive(**overrides)


def test_the_analysis_refuses_to_cap_the_spans_of_a_compressive_memory():
    """Capping would silently change nothing (or cap distances it does not have): one clear line instead."""
    loaded = LoadedModel(make_compressive().eval(), None, None, Path("compressive.pt"), Path("."))
    loaded.cap_spans(None)
    with pytest.raises(AnalysisError, match="has no span to cap.*--caps none"):
        loaded.cap_spans(16)
