"""Expire-Span attention (Sukhbaatar et al., ICML 2021, section 4), with a per-stream memory that forgets.

Symbols follow the paper: a block of M queries attends over [memory ; block]; memory ``i`` has an expire-span
``e_i = L * sigmoid(w . h_i + b)`` (4.1), remaining span ``r_{t,i} = e_i - (t - i)`` and soft mask
``m_{t,i} = clamp(1 + r_{t,i} / R, 0, 1)``; attention ``a'_{t,i} = m_{t,i} exp(s_{t,i}) / sum_j m_{t,j} exp(s_{t,j})``.
Shapes: B streams, K heads, D = H / K, M queries (block), N memories, T = N + M keys.

A layer's memory holds the layer's *input* hidden states of past positions, detached (truncated BPTT), and their
distance to the block's first query. The last M entries are always the previous block, so that the relative
position term (distances 1..M, paper 4.2 "Position Embedding") has a fixed layout. After each block a memory is
deleted as soon as no query of the next block can see it (4.2 "Block Parallel"); each stream keeps exactly its own
live entries, padded to the batch maximum and marked by ``valid``.
"""

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Projection:
    """Keys and values (B x T x H) and expire-spans (B x T, fp32; None for fixed spans) of T positions."""

    keys: Tensor
    values: Tensor
    spans: Optional[Tensor]


@dataclass
class LayerMemory:
    """What one layer remembers of each stream."""

    hidden: Optional[Tensor]  # B x N x H   layer inputs of past positions (detached); None when projected
    distance: Tensor  # B x N     distance to the current block's first query (fp32, >= 1)
    valid: Tensor  # B x N        False for padding (streams keep different numbers of entries)
    projection: Optional[Projection] = None  # evaluation: cached, since the weights do not change

    @classmethod
    def empty(cls, batch_size: int, block_size: int, hidden_size: int, like: Tensor) -> "LayerMemory":
        """A memory whose "previous block" is M invalid placeholders, so the position layout always holds."""
        return cls(
            hidden=like.new_zeros(batch_size, block_size, hidden_size),
            distance=_block_distances(block_size, like.device).flip(0).add(block_size).expand(batch_size, -1),
            valid=torch.zeros(batch_size, block_size, dtype=torch.bool, device=like.device),
        )

    def __len__(self) -> int:
        return self.distance.size(1)


def _block_distances(block_size: int, device) -> Tensor:
    """Distance from the block's first query to each position of the block: 0, -1, ..., -(M-1)."""
    return -torch.arange(block_size, dtype=torch.float32, device=device)


class SpanPredictor(nn.Module):
    """``e = L * sigmoid(w . (h / pre_div) + b)``, one per layer, shared by the heads; always computed in fp32."""

    def __init__(self, hidden_size: int, max_span: int, init_percentage: float, pre_div: float):
        super().__init__()
        self.max_span = max_span
        self.pre_div = pre_div
        self.proj = nn.Linear(hidden_size, 1)
        # w = 0, b = logit(p): every span starts at p * L ("small initial spans", 4.2).
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, math.log(init_percentage / (1.0 - init_percentage)))

    def forward(self, hidden: Tensor) -> Tensor:  # B x T x H -> B x T
        logit = F.linear(hidden.float() / self.pre_div, self.proj.weight.float(), self.proj.bias.float())
        return self.max_span * torch.sigmoid(logit.squeeze(-1))


def soft_mask(remaining: Tensor, ramp: int) -> Tensor:
    """``m = clamp(1 + r / R, 0, 1)``: 1 while the memory is alive, a linear ramp of length R, then 0."""
    return (remaining / ramp + 1.0).clamp(0.0, 1.0)


class _LogSoftMask(torch.autograd.Function):
    """``log m`` for ``m = clamp(1 + r / R, 0, 1)``: -inf where m = 0, gradient ``1 / (R m)`` on the ramp.

    Plain autograd through clamp and log would give ``0 * inf = NaN`` where m = 0, and more passes over the
    B x M x T tensor; this is one formula each way.
    """

    @staticmethod
    def forward(ctx, remaining: Tensor, ramp: int) -> Tensor:
        mask = soft_mask(remaining, ramp)
        ctx.save_for_backward(mask)
        ctx.ramp = ramp
        return mask.log()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        on_ramp = (mask > 0) & (mask < 1)
        return torch.where(on_ramp, grad / (mask * ctx.ramp), 0.0), None


def ramp_span_loss(remaining_first: Tensor, block_size: int, ramp: int) -> Tensor:
    """``sum_{t on the ramp} r_{t,i} / R`` for each memory i (4.2 "Loss Computation"), in O(#memories).

    ``remaining_first`` (B x T) is ``r`` seen from the block's first query; query t sees ``r - t``, which is on the
    ramp (0 < m < 1) for the integers ``r < t < r + R`` inside the block: an arithmetic series per memory whose
    derivative with respect to ``e_i`` is the number ``n_i`` of such queries.
    """
    with torch.no_grad():
        first = torch.floor(remaining_first).add(1).clamp(min=0)
        last = torch.ceil(remaining_first + ramp).sub(1).clamp(max=block_size - 1)
        count = (last - first + 1).clamp(min=0)
        offsets = count * (first + last) / 2  # sum of t over the ramp queries
    return (count * remaining_first - offsets) / ramp  # B x T


class RelativePositionTable(nn.Module):
    """Learned key-position vectors ``p_d`` for distances d = 1..M, shared by all layers (as the reference)."""

    def __init__(self, head_dim: int, block_size: int):
        super().__init__()
        self.block_size = block_size
        self.weight = nn.Parameter(torch.randn(head_dim, block_size) / math.sqrt(head_dim))  # D x M

    def scores(self, query: Tensor) -> Tensor:
        """``q_t . p_{t-i}`` for the last 2M keys (previous and current block), 0 outside distances 1..M.

        query: B x K x M x D  ->  B x K x M x 2M
        """
        M = query.size(-2)
        if M != self.block_size:
            raise ValueError(
                f"block of {M} tokens, but the model's position table covers {self.block_size}: use the "
                "--tokens-per-sample the model was trained with"
            )
        by_distance = torch.matmul(query, self.weight.to(query.dtype))  # B x K x M x M, column d-1
        t = torch.arange(M, device=query.device).unsqueeze(1)
        key = torch.arange(2 * M, device=query.device).unsqueeze(0)
        distance = t + M - key  # M x 2M: key index M + j is the block's position j
        in_range = (distance >= 1) & (distance <= M)
        index = (distance - 1).clamp(0, M - 1).expand(*by_distance.shape[:-1], -1)
        return torch.gather(by_distance, -1, index) * in_range.to(query.dtype)


@dataclass
class SpanRule:
    """How long memories live: learned expire-spans, or the fixed last-L window of Transformer-XL."""

    max_span: int  # L
    ramp: int  # R (expire-span only)
    learned: bool  # False: fixed span, m = 1 for 1 <= t - i <= L


class ExpireSpanAttention(nn.Module):
    """Multi-head attention over [memory ; block] with learned expiration, and the memory update after it."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        rule: SpanRule,
        attention_dropout: float,
        init_percentage: float = 0.1,
        pre_div: float = 1.0,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"--decoder-embed-dim {hidden_size} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.rule = rule
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(attention_dropout)
        self.span_predictor = (
            SpanPredictor(hidden_size, rule.max_span, init_percentage, pre_div) if rule.learned else None
        )

    def _heads(self, x: Tensor) -> Tensor:  # B x T x H -> B x K x T x D
        return x.view(x.size(0), x.size(1), self.num_heads, self.head_dim).transpose(1, 2)

    def project(self, x: Tensor) -> Projection:
        """Keys, values and spans of positions (B x T x H, normalized if pre-norm)."""
        spans = self.span_predictor(x) if self.span_predictor is not None else None
        return Projection(self.k_proj(x), self.v_proj(x), spans)

    def forward(
        self,
        block: Tensor,  # B x M x H   (normalized if pre-norm)
        past: Projection,  # of the N memories
        memory_distance: Tensor,  # B x N
        memory_valid: Tensor,  # B x N
        positions: RelativePositionTable,
        span_limit: Optional[float] = None,
    ):
        """Attention output (B x M x H), the projection of all T keys, the span loss (None: fixed spans), |C_t|.

        ``span_limit`` caps spans in the mask and the loss (training noise ``u * L``, or the inference cap).
        """
        B, M, _ = block.shape
        now = self.project(block)
        valid = torch.cat([memory_valid, memory_valid.new_ones(B, M)], dim=1)  # B x T
        first_distance = torch.cat(
            [memory_distance, _block_distances(M, block.device).expand(B, -1)], 1
        )  # B x T
        # t - i for every query t and key i; padding is infinitely far, so it gets m = 0 below
        query_offset = torch.arange(M, device=block.device, dtype=torch.float32).view(1, M, 1)
        distance = first_distance.masked_fill(~valid, math.inf).unsqueeze(1) + query_offset  # B x M x T

        keys = Projection(
            torch.cat([past.keys, now.keys], dim=1),  # B x T x H
            torch.cat([past.values, now.values], dim=1),
            torch.cat([past.spans, now.spans], dim=1) if self.rule.learned else None,  # B x T, fp32
        )
        aux = None
        if self.rule.learned:
            spans = keys.spans if span_limit is None else keys.spans.clamp(max=span_limit)
            log_mask = _LogSoftMask.apply(spans.unsqueeze(1) - distance, self.rule.ramp)  # B x M x T
            aux = ramp_span_loss(spans - first_distance, M, self.rule.ramp).masked_fill(~valid, 0.0).sum()
            last_visible = (
                torch.ceil(spans.detach() + self.rule.ramp - first_distance) - 1
            )  # m > 0: t - i < e + R
        else:
            limit = self.rule.max_span if span_limit is None else min(self.rule.max_span, span_limit)
            log_mask = torch.zeros_like(distance).masked_fill_(distance > limit, -math.inf)
            last_visible = torch.floor(limit - first_distance)  # m > 0: t - i <= L
        # causal, self excluded: block key j is visible from query t only if j < t
        log_mask[..., -M:].masked_fill_(_not_before(M, block.device), -math.inf)
        sees_something = (
            log_mask.amax(-1, keepdim=True) > -math.inf
        )  # B x M x 1: False only at a stream's start
        everyone_sees = bool(sees_something.all())
        if not everyone_sees:
            log_mask = log_mask.masked_fill(~sees_something, 0.0)

        q = self._heads(self.q_proj(block)) * self.head_dim**-0.5  # B x K x M x D
        k, v = self._heads(keys.keys), self._heads(keys.values)  # B x K x T x D
        # s = q.(k + p_{t-i}) / sqrt(D); the position term only for the previous and current block
        if (
            torch.is_grad_enabled()
        ):  # autograd would copy all of B x K x M x T back through an in-place view add
            scores = torch.cat(
                [
                    torch.matmul(q, k[:, :, : -2 * M].transpose(-1, -2)),
                    torch.matmul(q, k[:, :, -2 * M :].transpose(-1, -2)) + positions.scores(q),
                ],
                dim=-1,
            )
        else:
            scores = torch.matmul(q, k.transpose(-1, -2))
            scores[..., -2 * M :] += positions.scores(q)
        scores = scores.float()  # B x K x M x T
        # a' = m exp(s) / sum_j m exp(s_j) = softmax(s + log m)
        attn = torch.softmax(scores.add_(log_mask.unsqueeze(1)), dim=-1)
        attn = self.dropout(attn).to(v.dtype)
        out = torch.matmul(attn, v)  # B x K x M x D
        if not everyone_sees:
            out = out * sees_something.unsqueeze(1)
        out = out.transpose(1, 2).reshape(B, M, -1)  # B x M x H

        with torch.no_grad():  # |C_t|: key i is visible to the queries max(0, 1 - d_i) <= t <= last_visible_i
            first_visible = (1 - first_distance).clamp(min=0)
            seen_by = (last_visible.clamp(max=M - 1) - first_visible + 1).clamp(min=0) * valid
            attended = seen_by.sum() / (B * M)
        return self.out_proj(out), keys, aux, attended


@functools.lru_cache(maxsize=8)
def _not_before(block_size: int, device) -> Tensor:
    """M x M, True where block key j is not before query t (j >= t)."""
    return torch.ones(block_size, block_size, dtype=torch.bool, device=device).triu()


def update_memory(
    memory: LayerMemory,
    block: Tensor,
    keys: Projection,
    rule: SpanRule,
    span_limit: Optional[float] = None,
    cache_projection: bool = False,
) -> LayerMemory:
    """Delete memories no query of the next block can see; append the block; shift distances by M.

    Memory ``i`` survives iff ``m > 0`` for the next block's first query, at distance ``d' = d + M``:
    ``e_i + R > d'`` (expire-span, un-noised ``e``), or ``d' <= L`` (fixed span). The block itself is always
    kept (it is the next block's "previous block"). So a layer never holds more than L + R - 1 entries.
    ``keys`` is the projection of [memory ; block] the attention used; with ``cache_projection`` (evaluation)
    the surviving part is kept so the next block need not recompute it.
    """
    B, M, _ = block.shape
    N = len(memory)
    next_distance = memory.distance + M  # B x N
    if rule.learned:
        spans = keys.spans[:, :N]
        spans = spans if span_limit is None else spans.clamp(max=span_limit)
        keep = memory.valid & (spans + rule.ramp > next_distance)
    else:
        limit = rule.max_span if span_limit is None else min(rule.max_span, span_limit)
        keep = memory.valid & (next_distance <= limit)

    # Per-stream compaction in one gather over [memory ; block]: slot s < kept takes the stream's (s+1)-th
    # surviving entry (padding, marked invalid, where a stream has fewer), slot kept + j the block's entry j.
    count = keep.sum(1)  # B
    kept = int(count.max()) if N else 0
    rank = torch.arange(1, kept + 1, device=block.device).expand(B, -1).contiguous()
    survivors = torch.searchsorted(keep.cumsum(1), rank).clamp(max=max(N - 1, 0))  # B x kept
    index = torch.cat([survivors, torch.arange(N, N + M, device=block.device).expand(B, -1)], dim=1)
    # as rows of the flattened batch: index_select copies whole rows, a gather would index every element
    rows = (index + torch.arange(B, device=block.device).unsqueeze(1) * (N + M)).flatten()  # B * (kept + M)

    def select(source: Tensor) -> Tensor:  # B x (N + M) x ... -> B x (kept + M) x ...
        return source.flatten(0, 1).index_select(0, rows).view(B, -1, *source.shape[2:])

    projection = hidden = None
    if cache_projection:  # the hidden states are only needed to project them again
        projection = Projection(*(select(x.detach()) if x is not None else None for x in vars(keys).values()))
    else:
        hidden = select(torch.cat([memory.hidden, block.detach()], dim=1))
    block_distance = _block_distances(M, block.device).add(M).expand(B, -1)
    return LayerMemory(
        hidden=hidden,
        distance=select(torch.cat([next_distance, block_distance], dim=1)),
        valid=torch.cat([rank <= count.unsqueeze(1), keep.new_ones(B, M)], dim=1),
        projection=projection,
    )
