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

Generation reads tokens one at a time (:class:`StepMemory`, :meth:`ExpireSpanAttention.step`): each new token is
the query ``t`` of the same equations, over every memory it can still see, and a memory is deleted the step it
expires, so a layer holds at most L + R - 1 entries whatever the length.
"""

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)


@dataclass
class Projection:
    """Keys and values (B x T x H; None where only the spans are needed) and expire-spans (B x T, fp32; None for
    fixed spans) of T positions."""

    keys: Optional[Tensor]
    values: Optional[Tensor]
    spans: Optional[Tensor]
    # what they were projected from (B x T x H), kept by the projections' backward anyway: training attention
    # projects it again instead of keeping the keys and values
    source: Optional[Tensor] = None


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


# Backward passes rebuild fp32 tensors (scores, copies of layer inputs) in blocks of at most this many elements
# (4 MB), whatever B: at the paper's per-GPU batch the last 2M keys' scores alone are 1 GiB per tensor
# (64 x 8 x 512 x 1024). Blocks of 4 MB rather than 16 train cpu_small in bf16 about 10% faster (they stay in
# cache) with 7% less peak memory, fp32 unchanged (benchmark, alternating runs; README).
BACKWARD_BLOCK_ELEMENTS = 1 << 20


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
        # w . (h / pre_div) as (w / pre_div) . h
        logit = _SpanLogit.apply(hidden, self.proj.weight.float() / self.pre_div, self.proj.bias.float())
        return self.max_span * torch.sigmoid(logit)


class _SpanLogit(torch.autograd.Function):
    """``w . h + b`` in fp32 (B x T x H -> B x T), keeping h for the backward in its own dtype. Autograd through
    ``F.linear(h.float(), ...)`` would keep an fp32 copy of h in bf16 or fp16: B x T x H per layer, the largest
    tensor a layer keeps there (memories included). The weight's gradient is summed a few streams at a time
    (:data:`BACKWARD_BLOCK_ELEMENTS`), so the backward's fp32 copies of h are as small."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(hidden, weight)
        return F.linear(hidden.float(), weight, bias).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad: B x T, fp32
        hidden, weight = ctx.saved_tensors
        grad_hidden = (grad.unsqueeze(-1) * weight).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        B, T, H = hidden.shape
        streams = max(1, BACKWARD_BLOCK_ELEMENTS // (T * H))
        grad_weight = sum(
            grad[b : b + streams].flatten().unsqueeze(0) @ hidden[b : b + streams].flatten(0, 1).float()
            for b in range(0, B, streams)
        )  # 1 x H
        return grad_hidden, grad_weight, grad.sum().view(1)


def _query_offsets(block_size: int, device) -> Tensor:
    """M x 1: how much further each query of the block is from every key than the first query is (t = 0..M-1)."""
    return torch.arange(block_size, dtype=torch.float32, device=device).unsqueeze(1)


def _block_soft_mask(remaining_first: Tensor, block_size: int, ramp: int) -> Tensor:
    """``m_{t,i}`` for the block's queries from ``r_i`` seen from its first query: ... x T -> ... x M x T
    (B x T for a span per key, B x K x T for a span per head)."""
    return _block_ramp_deficit(remaining_first, block_size, ramp).add_(1.0)


def _block_log_soft_mask(remaining_first: Tensor, block_size: int, ramp: int) -> Tensor:
    """``log m_{t,i}`` as :func:`_block_soft_mask`, -inf where m = 0: ``log1p(m - 1)``, since torch's CPU ``log``
    takes a slow path (about 20x) on every vector holding a 0, and expired keys make many;
    ``log1p(-1)`` does not.
    """
    return _block_ramp_deficit(remaining_first, block_size, ramp).log1p_()


def _block_ramp_deficit(remaining_first: Tensor, block_size: int, ramp: int) -> Tensor:
    """``m_{t,i} - 1 = clamp(r_{t,i} / R, -1, 0)`` (... x T -> ... x M x T): query t sees ``r_i - t``, so this is
    one subtraction per element from a per-key term."""
    offsets = _query_offsets(block_size, remaining_first.device) / ramp  # M x 1
    return ((remaining_first / ramp).unsqueeze(-2) - offsets).clamp_(-1.0, 0.0)


def _exp_(x: Tensor) -> Tensor:
    """``exp`` in place as ``exp2(x log2 e)``: torch's CPU ``exp`` takes a slow path (about 10x) on every vector
    whose result underflows, ``exp(-inf) = 0`` of the keys a query cannot see included; ``exp2`` does not."""
    return x.mul_(1.0 / math.log(2.0)).exp2_()


class _LogSoftMask(torch.autograd.Function):
    """``log m_{t,i}`` (... x M x T) from ``r_i`` seen from the block's first query (... x T); -inf where m = 0.

    The gradient on ``r_i`` is ``sum_t 1 / (R m_{t,i})`` over the queries t that see i on the ramp. Plain
    autograd through clamp and log would give ``0 * inf = NaN`` where m = 0, make more passes over B x M x T, and
    keep B x M x T tensors for the backward; this keeps only ``r`` and recomputes the mask.
    """

    @staticmethod
    def forward(ctx, remaining_first: Tensor, block_size: int, ramp: int) -> Tensor:
        ctx.save_for_backward(remaining_first)
        ctx.block_size, ctx.ramp = block_size, ramp
        return _block_log_soft_mask(remaining_first, block_size, ramp)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (remaining_first,) = ctx.saved_tensors
        mask = _block_soft_mask(remaining_first, ctx.block_size, ctx.ramp)
        return _ramp_gradient(grad, mask, ctx.ramp), None, None


def _ramp_gradient(grad_log_mask: Tensor, mask: Tensor, ramp: int) -> Tensor:
    """``d r_i = sum_t d log m_{t,i} / (R m_{t,i})`` over the queries t that see i on the ramp (0 < m < 1), the
    only place ``log m`` depends on ``r``: ... x M x n -> ... x n."""
    on_ramp = (mask > 0) & (mask < 1)
    return torch.where(on_ramp, grad_log_mask / mask, 0.0).sum(-2) / ramp


class _SoftmaxInFloat(torch.autograd.Function):
    """``softmax(s + log m)`` over the keys (B x K x M x T scores; fp32 log m, B x 1 x M x T shared by the heads or
    B x K x M x T per head) computed in fp32, returned and saved in the scores' dtype.

    In bf16 or fp16, plain autograd would keep both the fp32 probabilities and their low-precision copy (B x K x M
    x T each) for the backward; the backward here runs in fp32 from the saved copy. In fp32 it is exactly
    ``torch.softmax``.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, log_mask: Tensor) -> Tensor:
        probs = torch.softmax(scores.float().add_(log_mask), dim=-1).to(scores.dtype)
        ctx.save_for_backward(probs)
        ctx.shared_by_heads = log_mask.size(1) == 1
        return probs

    @staticmethod
    def backward(ctx, grad: Tensor):
        (probs,) = ctx.saved_tensors
        grad_scores = torch._softmax_backward_data(grad.float(), probs.float(), -1, torch.float32)
        grad_mask = grad_scores.sum(1, keepdim=True) if ctx.shared_by_heads else grad_scores.clone()
        return grad_scores.to(probs.dtype), grad_mask


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

        query: B x K x M x D  ->  B x K x M x 2M. Key c of the last 2M is at distance ``t + M - c`` from query t,
        so row t is the band ``q_t . p_M, ..., q_t . p_1`` starting at column t (Transformer-XL's relative shift,
        here a strided view of the scores).
        """
        scores = query.new_zeros(*query.shape[:-1], 2 * query.size(-2))
        self.add_scores_(query, scores)
        return scores

    def add_scores_(self, query: Tensor, scores: Tensor) -> None:
        """Add ``q_t . p_{t-i}`` to ``scores`` (B x K x M x 2M, any strides) in place."""
        M = query.size(-2)
        if M != self.block_size:
            raise ValueError(
                f"block of {M} tokens, but the model's position table covers {self.block_size}: use the "
                "--tokens-per-sample the model was trained with"
            )
        band = torch.matmul(query, self.weight.flip(-1).to(query.dtype))  # B x K x M x M, column j: d = M - j
        _band(scores).add_(band)

    def backward(self, query: Tensor, grad_scores: Tensor):
        """The gradients of :meth:`add_scores_` on the query (B x K x M x D) and the table (D x M), given those
        of the scores (B x K x M x 2M)."""
        grad_band = _band(grad_scores)  # B x K x M x M
        table = self.weight.flip(-1).to(query.dtype)  # D x M
        grad_query = torch.matmul(grad_band, table.t())
        grad_table = torch.matmul(query.transpose(-1, -2), grad_band).sum((0, 1)).flip(-1)
        return grad_query, grad_table.to(self.weight.dtype)

    def scores_at(self, query: Tensor, distance: Tensor) -> Tensor:
        """``q . p_d`` for one query (B x K x 1 x D) and keys at distance d (B x N, any layout): B x K x 1 x N,
        0 outside distances 1..M (older memories get no position term, as in block processing)."""
        B, K = query.shape[:2]
        table = torch.matmul(query, self.weight.to(query.dtype))  # B x K x 1 x M, column c: d = c + 1
        index = (distance.long() - 1).clamp(0, self.block_size - 1)  # B x N
        scores = table.gather(-1, index[:, None, None, :].expand(B, K, 1, -1))
        near = (distance >= 1) & (distance <= self.block_size)
        return scores * near[:, None, None, :]


def _band(scores: Tensor) -> Tensor:
    """The view of ``scores`` (... x M x 2M, any strides) whose (t, j) is (t, t + j): the M keys at distances
    M, ..., 1 from query t, one row and one column further per t (Transformer-XL's relative shift)."""
    M = scores.size(-2)
    row, column = scores.stride()[-2:]
    strides = (*scores.stride()[:-2], row + column, column)
    return scores.as_strided((*scores.shape[:-1], M), strides, scores.storage_offset())


@dataclass
class SpanRule:
    """How long memories live: learned expire-spans, or the fixed last-L window of Transformer-XL."""

    max_span: int  # L
    ramp: int  # R (expire-span only)
    learned: bool  # False: fixed span, m = 1 for 1 <= t - i <= L


def alive(
    spans: Optional[Tensor], next_distance: Tensor, rule: SpanRule, span_limit: Optional[float]
) -> Tensor:
    """Whether the next query, at ``next_distance`` (B x N), can see each memory: ``m > 0``, i.e. ``e_i + R > d'``
    (expire-span, un-noised e capped at ``span_limit``), or ``d' <= L`` (fixed span)."""
    if rule.learned:
        spans = spans if span_limit is None else spans.clamp(max=span_limit)
        return spans + rule.ramp > next_distance
    limit = rule.max_span if span_limit is None else min(rule.max_span, span_limit)
    return next_distance <= limit


@dataclass
class SoftMask:
    """``m_{t,i}`` of a block's M queries over its T keys, kept as one term per key: ``r_i`` seen from the block's
    first query (query t sees ``r_i - t``). That is O(B K' T) where the mask is B x K' x M x T, so attention can
    rebuild any part of it instead of keeping it (K' = 1: shared by the heads; K: one per head)."""

    remaining: (
        Tensor  # B x K' x T   r_i (fp32, -inf for padding); fixed span: L - (t - i) from the first query
    )
    block_size: int  # M
    ramp: Optional[int]  # R; None: a fixed span's window, m = 1 iff r_i - t >= 0
    causal: bool  # the last M keys are the block itself: query t sees block key j only if j < t

    def log(self) -> Tensor:
        """``log m`` (B x K' x M x T, fp32), -inf where m = 0 or not causal; its gradient reaches ``remaining``
        only on the ramp (:class:`_LogSoftMask`)."""
        M, device = self.block_size, self.remaining.device
        if self.ramp is not None:
            log_mask = _LogSoftMask.apply(self.remaining, M, self.ramp)
        else:
            too_far = self.remaining.unsqueeze(-2) < _query_offsets(M, device)  # r - t < 0: t - i > L
            log_mask = torch.zeros(too_far.shape, device=device).masked_fill_(too_far, -math.inf)
        if self.causal:
            log_mask[..., -M:].masked_fill_(_not_before(M, device), -math.inf)
        return log_mask

    def last_visible(self) -> Tensor:
        """B x K' x T: the last query that sees each key (m > 0: r - t > -R; fixed span: r - t >= 0)."""
        remaining = self.remaining.detach()
        return torch.ceil(remaining + self.ramp) - 1 if self.ramp is not None else torch.floor(remaining)


def _fill_rows_that_see_nothing_(log_mask: Tensor) -> Tensor:
    """Rows of ``log m`` (B x K' x M x T) that see no key (a stream's start) become 0 in place, so that softmax
    and kernels stay finite; returns B x K' x M x 1, False for them (their output is set to 0). Applied
    unconditionally: testing for such rows first would stall a GPU's queue once per layer (host sync)."""
    sees_something = log_mask.amax(-1, keepdim=True) > -math.inf
    log_mask.masked_fill_(~sees_something, 0.0)
    return sees_something


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logger.info(message)


class ExpireSpanAttention(nn.Module):
    """Multi-head attention over [memory ; block] with learned expiration, and the memory update after it.

    ``kernel``: "fused" trains through the fused kernels (:class:`_FusedSpanAttention`) where they can (no
    attention dropout, a kernel for the device), else the plain path; "plain": always the plain reference path
    (the B x K x M x T scores and probabilities, kept for the backward).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        rule: SpanRule,
        attention_dropout: float,
        init_percentage: float = 0.1,
        pre_div: float = 1.0,
        kernel: str = "fused",
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"--decoder-embed-dim {hidden_size} is not divisible by {num_heads} heads")
        if kernel not in ("fused", "plain"):
            raise ValueError(f"attention kernel {kernel!r}: must be fused or plain")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.rule = rule
        self.kernel = kernel
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
        return Projection(self.k_proj(x), self.v_proj(x), spans, source=x)

    def forward(
        self,
        block: Tensor,  # B x M x H   (normalized if pre-norm)
        past: Projection,  # of the N memories
        memory_distance: Tensor,  # B x N
        memory_valid: Tensor,  # B x N
        positions: RelativePositionTable,
        span_limit: Optional[float] = None,
    ):
        """Attention output (B x M x H), the projection of all T keys (``projected``), the span loss (None: fixed
        spans) and |C_t| (``attn_mem``, keys attended per query).

        ``span_limit`` caps spans in the mask and the loss (training noise ``u * L``, or the inference cap).
        """
        B, M, _ = block.shape
        now = self.project(block)
        valid = torch.cat([memory_valid, memory_valid.new_ones(B, M)], dim=1)  # B x T
        first_distance = torch.cat(
            [memory_distance, _block_distances(M, block.device).expand(B, -1)], 1
        )  # B x T
        far = first_distance.masked_fill(~valid, math.inf)  # padding is infinitely far, so it gets m = 0

        projected = Projection(
            torch.cat([past.keys, now.keys], dim=1),  # B x T x H
            torch.cat([past.values, now.values], dim=1),
            torch.cat([past.spans, now.spans], dim=1) if self.rule.learned else None,  # B x T, fp32
        )
        mask = self.span_mask(projected.spans, far, M, span_limit, causal=True)
        span_loss = self.span_loss(projected.spans, first_distance, valid, M, span_limit)
        q = self._heads(self.q_proj(block)) * self.head_dim**-0.5  # B x K x M x D
        k, v = self._heads(projected.keys), self._heads(projected.values)  # B x K x T x D
        sources = (past.source, block) if past.source is not None else None  # of k and v
        out = self.attend(q, k, v, mask, positions, sources).transpose(1, 2).reshape(B, M, -1)  # B x M x H
        attn_mem = attn_mem_of(mask, first_distance, valid)
        return self.out_proj(out), projected, span_loss, attn_mem

    def step(
        self,
        token: Tensor,  # B x 1 x H   (normalized if pre-norm)
        memory: "StepMemory",  # N entries
        positions: RelativePositionTable,
        span_limit: Optional[float] = None,
    ):
        """One new token per stream: the query t of :meth:`forward`, over every memory it can see (earlier
        tokens of its block included) with the same mask, spans and position term; then it joins the memory.

        Returns the attention output (B x 1 x H) and the memory for the next token. ``span_limit``: the inference
        cap, in the mask and in deletion (as block processing in evaluation).
        """
        B = token.size(0)
        far = memory.distance.masked_fill(~memory.valid, math.inf)  # B x N: t - i, padding infinitely far
        # the block's mask for a block of one query: B x K' x 1 x N
        log_mask = self.span_mask(memory.spans, far, 1, span_limit, causal=False).log()
        sees_something = _fill_rows_that_see_nothing_(log_mask)  # B x K' x 1 x 1: False at a stream's start

        q = self._heads(self.q_proj(token)) * self.head_dim**-0.5  # B x K x 1 x D
        k, v = self._heads(memory.keys), self._heads(memory.values)  # B x K x N x D
        # s = q.(k + p_{t-i}) / sqrt(D), the position term for distances 1..M; a' = softmax(s + log m)
        scores = (torch.matmul(q, k.transpose(-1, -2)) + positions.scores_at(q, memory.distance)).float()
        attn = torch.softmax(scores + log_mask, dim=-1)  # B x K x 1 x N
        out = torch.matmul(self.dropout(attn).to(v.dtype), v) * sees_something  # B x K x 1 x D
        out = out.transpose(1, 2).reshape(B, 1, -1)  # B x 1 x H
        return self.out_proj(out), memory.advance(self.project(token), self.rule, span_limit)

    def span_mask(self, spans, far, block_size: int, span_limit: Optional[float], causal: bool) -> SoftMask:
        """The soft mask ``m_{t,i} = clamp(1 + (e_i - (t - i)) / R, 0, 1)`` (4.1; fixed span: 1 for t - i <= L) of
        the block's queries, from the spans ``e`` (B x T) capped at ``span_limit`` and ``far``, the distance from
        the block's first query (B x T, padding at infinity)."""
        if self.rule.learned:
            spans = spans if span_limit is None else spans.clamp(max=span_limit)
            return SoftMask((spans - far).unsqueeze(1), block_size, self.rule.ramp, causal)
        limit = self.rule.max_span if span_limit is None else min(self.rule.max_span, span_limit)
        return SoftMask((limit - far).unsqueeze(1), block_size, None, causal)

    def span_loss(self, spans, first_distance, valid, block_size: int, span_limit: Optional[float]):
        """``sum_{t,i on the ramp} r_{t,i} / R`` over the block's queries and valid keys (4.2 "Loss
        Computation"); None for fixed spans."""
        if not self.rule.learned:
            return None
        spans = spans if span_limit is None else spans.clamp(max=span_limit)
        return (
            ramp_span_loss(spans - first_distance, block_size, self.rule.ramp).masked_fill(~valid, 0.0).sum()
        )

    @torch.no_grad()
    def _keys_and_values(self, past_source: Tensor, block: Tensor):
        """k and v of [memory ; block] (B x K x T x D), projected again exactly as :meth:`forward` did."""
        keys = torch.cat([self.k_proj(past_source), self.k_proj(block)], dim=1)  # B x T x H
        values = torch.cat([self.v_proj(past_source), self.v_proj(block)], dim=1)
        return self._heads(keys), self._heads(values)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: SoftMask,
        positions: RelativePositionTable,
        sources: Optional[tuple] = None,
    ):
        """``a' v`` with ``a' = m exp(s) / sum_j m exp(s_j) = softmax(s + log m)``, ``s = q.(k + p_{t-i})`` (q
        already scaled by 1 / sqrt(D); the position term only for the last 2M keys, the previous and current
        block): q B x K x M x D, k and v B x K x T x D -> B x K x M x D, 0 for rows that see nothing.

        Evaluation: fused kernels. Training: :class:`_FusedSpanAttention` (exact gradients, nothing of size
        B x K x M x T kept; k and v projected again for the backward from their ``sources``, what memory and
        block were projected from, else kept), or the plain reference path (``kernel="plain"``, attention dropout, no kernel for the device; logged once).
        """
        if not torch.is_grad_enabled():
            log_mask = mask.log()
            sees_something = _fill_rows_that_see_nothing_(log_mask)
            dropout_p = self.dropout.p if self.training else 0.0
            return fused_attention(q, k, v, log_mask, positions, dropout_p) * sees_something
        reason = self._plain_reason(q)
        if reason is None:
            project = None if sources is None else self._keys_and_values
            return _FusedSpanAttention.apply(
                q, k, v, mask.remaining, positions.weight, mask, positions, project, *(sources or (k, v))
            )
        if self.kernel == "fused":
            _log_once(reason)
        return self._plain_attention(q, k, v, mask, positions)

    def _plain_reason(self, q: Tensor) -> Optional[str]:
        """Why training attention takes the plain path, or None for the fused one."""
        if self.kernel == "plain":
            return "--attention-kernel plain"
        if self.training and self.dropout.p > 0:
            return (
                f"attention dropout {self.dropout.p}: the fused kernels cannot replay its mask in the backward, "
                "so training attention takes the plain path (B x K x M x T probabilities kept)"
            )
        if not _has_fused_kernel(q.device):
            return f"no fused attention kernel with a log-sum-exp on {q.device.type}: training attention is plain"
        return None

    def _plain_attention(self, q, k, v, mask: SoftMask, positions: RelativePositionTable) -> Tensor:
        """The reference: fp32 scores and probabilities of every head, query and key (B x K x M x T), the
        probabilities kept for the backward (:class:`_SoftmaxInFloat`)."""
        M = q.size(-2)
        log_mask = mask.log()  # B x K' x M x T
        sees_something = _fill_rows_that_see_nothing_(log_mask)
        # the position term goes into its own part: autograd would copy all of B x K x M x T back through an
        # in-place add to a view
        scores = torch.cat(
            [
                torch.matmul(q, k[:, :, : -2 * M].transpose(-1, -2)),
                torch.matmul(q, k[:, :, -2 * M :].transpose(-1, -2)) + positions.scores(q),
            ],
            dim=-1,
        )  # B x K x M x T
        out = torch.matmul(self.dropout(_SoftmaxInFloat.apply(scores, log_mask)), v)  # B x K x M x D
        return out * sees_something


def attn_mem_of(mask: SoftMask, first_distance: Tensor, valid: Tensor) -> Tensor:
    """The paper's memory size |C_t|: keys with m > 0 per query, mean over the block's queries (and heads). Key i
    is visible to the queries ``max(0, 1 - d_i) <= t <= last_visible_i``."""
    with torch.no_grad():
        B, M = first_distance.size(0), mask.block_size
        first_visible = (1 - first_distance).clamp(min=0).unsqueeze(1)  # B x 1 x T
        seen_by = (mask.last_visible().clamp(max=M - 1) - first_visible + 1).clamp(min=0) * valid.unsqueeze(1)
        return seen_by.sum() / (B * M * seen_by.size(1))  # seen_by: B x K' x T


# The CPU flash kernel behind scaled_dot_product_attention, called directly for its log-sum-exp (the public
# function does not return it); on CUDA the memory-efficient kernel, which also returns it.
_CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"


def _has_fused_kernel(device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and hasattr(torch.ops.aten, _CPU_FLASH))


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_mask: Tensor,
    positions: RelativePositionTable,
    dropout_p: float = 0.0,
) -> Tensor:
    """``softmax(q . k + log m + position term) v`` (q already scaled) in fused kernels, without autograd.

    q: B x K x M x D, k and v: B x K x T x D, log m: B x K' x M x T (fp32; K' = 1 when the heads share it)
    -> B x K x M x D. Every row must see a key.
    """
    if q.device.type == "cpu" and k.size(-2) > 2 * q.size(-2) and _has_fused_kernel(q.device):
        return _split_flash_attention(q, k, v, log_mask, positions, dropout_p)[0]
    return _whole_bias_attention(q, k, v, log_mask, positions, dropout_p)


def _whole_bias_attention(q, k, v, log_mask, positions, dropout_p):
    """The plain fused path: one call, with log m copied to every head and the position term added."""
    B, K, M, _ = q.shape
    bias = q.new_empty(B, K, M, log_mask.size(-1)).copy_(log_mask)  # B x K x M x T
    positions.add_scores_(q, bias[..., -2 * M :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=1.0)


def _recent_bias(q: Tensor, log_mask: Tensor, positions: RelativePositionTable) -> Tensor:
    """log m of the last 2M keys plus their position term, per head: B x K x M x 2M in q's dtype."""
    B, K, M, _ = q.shape
    bias = q.new_empty(B, K, M, 2 * M).copy_(log_mask[..., -2 * M :])
    positions.add_scores_(q, bias)
    return bias


def _split_flash_attention(q, k, v, log_mask, positions, dropout_p):
    """Output (B x K x M x D) and log-sum-exp (B x K x M, fp32) over all T keys in two kernel calls. The older
    memories' keys (all but the last 2M, if any) have no position term, so their bias is log m, shared by the
    heads where it is (B x 1 x M x A, broadcast by the kernel, never copied K times). The two parts are merged by
    their log-sum-exps: ``o = (e^{lse_old} o_old + e^{lse_recent} o_recent) / (e^{lse_old} + e^{lse_recent})``.
    """
    M = q.size(-2)
    old = k.size(-2) - 2 * M
    recent = _flash_with_log_sum_exp(
        q, k[:, :, old:], v[:, :, old:], log_mask[..., old:], _recent_bias(q, log_mask, positions), dropout_p
    )
    if old == 0:
        return recent
    parts = [
        _flash_with_log_sum_exp(q, k[:, :, :old], v[:, :, :old], log_mask[..., :old], None, dropout_p),
        recent,
    ]
    total = torch.logaddexp(parts[0][1], parts[1][1])  # B x K x M
    return sum(out * (lse - total).exp().unsqueeze(-1).to(out.dtype) for out, lse in parts), total


def _flash_with_log_sum_exp(q, k, v, log_mask, bias, dropout_p):
    """Output and log-sum-exp (B x K x M, fp32) of the fused kernel over keys with mask ``log_mask``
    (B x K' x M x T'), and the per-head ``bias`` if given (else log m); lse = -inf for a row that sees none of
    these keys (the kernel gives 0 there)."""
    out, lse = _kernel_forward(q, k, v, log_mask if bias is None else bias, dropout_p)
    sees_nothing = log_mask.amax(-1) == -math.inf  # B x K' x M
    return out, lse.masked_fill(sees_nothing, -math.inf)


def _kernel_forward(q, k, v, bias, dropout_p=0.0):
    """The fused kernel over keys k with an additive bias (B x K' x M x T'): output and log-sum-exp (B x K x M).

    The bias may be fp32 whatever q's dtype: the CPU kernel reads it as it is (it works in fp32), so log m reaches
    it unrounded and never copied; CUDA's gets it copied in q's dtype (:func:`_aligned_bias`)."""
    if q.device.type == "cpu":
        return getattr(torch.ops.aten, _CPU_FLASH)(q, k, v, dropout_p, False, attn_mask=bias, scale=1.0)
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, _aligned_bias(bias, q), True, dropout_p, False, scale=1.0
    )
    return out, lse[..., : q.size(-2)]  # the CUDA kernel pads its lse's query dimension


def _kernel_backward(grad, q, k, v, bias, out, lse):
    """q, k, v gradients of the kernel's keys from ``out`` and ``lse``, the merged output and log-sum-exp of all
    the keys: then ``P = exp(s + bias - lse)`` and ``delta = rowsum(dO o)`` are those of the whole softmax, so a
    part's gradients are exactly its share of the whole's. The bias as in :func:`_kernel_forward`."""
    if q.device.type == "cpu":
        return getattr(torch.ops.aten, _CPU_FLASH + "_backward")(
            grad, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=1.0
        )
    M = q.size(-2)
    align = 1 if torch.version.hip else 32  # the kernel's lse layout: queries padded to a multiple of this
    padded = F.pad(lse, (0, -M % align))
    seed = offset = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad,
        q,
        k,
        v,
        _aligned_bias(bias, q),
        out,
        padded,
        seed,
        offset,
        0.0,
        [True, True, True, False],
        False,
        scale=1.0,
    )
    return dq, dk, dv


def _aligned_bias(bias: Tensor, q: Tensor) -> Tensor:
    """The CUDA kernel wants the bias in q's dtype and per head, its rows aligned to 16 elements: B x K x M x T'
    (a view of one copy)."""
    B, K, M, _ = q.shape
    width = bias.size(-1)
    aligned = bias.new_empty(*bias.shape[:-1], width + (-width % 16), dtype=q.dtype)[..., :width].copy_(bias)
    return aligned.expand(B, K, M, width)


class _FusedSpanAttention(torch.autograd.Function):
    """:meth:`ExpireSpanAttention.attend` through the fused kernels, with exact gradients. Saved: q, the output,
    its log-sum-exp (B x K x M) and the per-key ``r`` (:class:`SoftMask`); never B x K x M x T. k and v are
    ``project(*sources)`` again (from what the projections keep anyway), or the ``sources`` themselves.

    Backward, with ``P = exp(s + log m - lse)``, ``delta = rowsum(dO o)`` and ``dS = P (dO . v - delta)``:
    - the older keys' q, k, v gradients from the kernel's backward (:func:`_kernel_backward`);
    - the last 2M keys (own position term, B x K x M x 2M) by recomputing their scores: q, k and the position
      table get ``dS`` through them, v gets ``P^T dO``;
    - ``r`` only where ``log m`` depends on it, the ramp (:func:`_ramp_gradient`): the last 2M keys from their
      ``dS``, the older ones from the scores of the keys whose ramp meets the block (:func:`_far_ramp_gradient`).
    ``d log m = dS``, summed over the heads where they share the mask.
    """

    @staticmethod
    def forward(
        ctx, q, k, v, remaining, table, mask: SoftMask, positions: RelativePositionTable, project, *sources
    ):
        mask = dataclasses.replace(mask, remaining=remaining)
        log_mask = mask.log()  # B x K' x M x T, rebuilt in the backward
        sees_something = _fill_rows_that_see_nothing_(log_mask)
        out, lse = _split_flash_attention(q, k, v, log_mask, positions, 0.0)
        ctx.save_for_backward(q, remaining, out, lse, sees_something, *sources)
        ctx.mask, ctx.positions, ctx.project = mask, positions, project
        return out * sees_something

    @staticmethod
    def backward(ctx, grad):
        q, remaining, out, lse, sees_something, *sources = ctx.saved_tensors
        k, v = sources if ctx.project is None else ctx.project(*sources)  # B x K x T x D
        mask = dataclasses.replace(ctx.mask, remaining=remaining)
        old = k.size(-2) - 2 * q.size(-2)
        log_mask = mask.log()
        log_mask.masked_fill_(~sees_something, 0.0)
        grad = (grad * sees_something).to(q.dtype)  # B x K x M x D
        delta = (grad.float() * out.float()).sum(-1, keepdim=True)  # B x K x M x 1
        lse = lse.unsqueeze(-1)  # B x K x M x 1
        learned = ctx.needs_input_grad[3]

        grad_q, grad_k, grad_v, grad_table, grad_remaining = _recent_backward(
            q, k[:, :, old:], v[:, :, old:], grad, delta, lse, log_mask, mask, ctx.positions, learned
        )
        if learned:
            older = _far_ramp_gradient(
                q,
                k[:, :, :old],
                v[:, :, :old],
                grad,
                delta,
                lse,
                remaining[..., :old],
                mask.block_size,
                mask.ramp,
            )
            grad_remaining = torch.cat([older, grad_remaining], dim=-1)
        if old > 0:
            grad_q_old, grad_k_old, grad_v_old = _kernel_backward(
                grad, q, k[:, :, :old], v[:, :, :old], log_mask[..., :old], out, lse.squeeze(-1)
            )
            layout = torch.empty_like(k, device="meta")  # k's strides, no storage
            del k, v, log_mask  # before the gradients of all T keys are assembled
            grad_q = grad_q + grad_q_old
            grad_k, grad_v = (
                _joined_keys(layout, old_part, recent_part)
                for old_part, recent_part in ((grad_k_old, grad_k), (grad_v_old, grad_v))
            )
        return grad_q, grad_k, grad_v, grad_remaining, grad_table, None, None, None, None, None


def _joined_keys(like: Tensor, old: Tensor, recent: Tensor) -> Tensor:
    """[old ; recent] along the keys (B x K x T x D), laid out in memory as ``like`` (k and v are heads of B x T x
    H, so autograd's way back to B x T x H is then a view, not a copy of all T keys; the CPU kernel's old part
    already has that layout)."""
    joined = torch.empty_like(like, device=recent.device)
    joined[:, :, : old.size(2)].copy_(old)
    joined[:, :, old.size(2) :].copy_(recent)
    return joined


def _recent_backward(q, k, v, grad, delta, lse, log_mask, mask: SoftMask, positions, span_gradient: bool):
    """The last 2M keys' share of the backward (their position term is in no kernel's bias), a few streams at a
    time, or a few heads of one stream (:data:`BACKWARD_BLOCK_ELEMENTS`). Returns the gradients of q, of these
    keys' k and v, of the position table and (``span_gradient``) of their ``r``."""
    B, K, M, _ = q.shape
    per_head = M * k.size(-2)
    heads = max(1, min(K, BACKWARD_BLOCK_ELEMENTS // per_head))
    streams = max(1, BACKWARD_BLOCK_ELEMENTS // (K * per_head)) if heads == K else 1
    if streams >= B:
        return _recent_backward_of(q, k, v, grad, delta, lse, log_mask, mask, positions, span_gradient)
    shared = mask.remaining.size(1) == 1  # then d r sums over the heads, so over the heads' parts

    def part(b: slice, h: slice):
        h_mask = slice(None) if shared else h
        return _recent_backward_of(
            *(x[b, h] for x in (q, k, v, grad, delta, lse)),
            log_mask[b, h_mask],
            dataclasses.replace(mask, remaining=mask.remaining[b, h_mask]),
            positions,
            span_gradient,
        )

    def joined(parts, dim: int, add_remaining: bool):
        grad_q, grad_k, grad_v, grad_table, grad_remaining = zip(*parts)
        if span_gradient:
            grad_remaining = sum(grad_remaining) if add_remaining else torch.cat(grad_remaining, dim)
        return (
            torch.cat(grad_q, dim),
            torch.cat(grad_k, dim),
            torch.cat(grad_v, dim),
            sum(grad_table),
            grad_remaining if span_gradient else None,
        )

    rows = [
        joined([part(slice(b, b + streams), slice(h, h + heads)) for h in range(0, K, heads)], 1, shared)
        for b in range(0, B, streams)
    ]
    return joined(rows, 0, False)


def _recent_backward_of(q, k, v, grad, delta, lse, log_mask, mask: SoftMask, positions, span_gradient: bool):
    """:func:`_recent_backward` of some streams: the scores ``s = q.(k + p_{t-i})`` recomputed (B x K x M x 2M),
    ``P`` and ``dS`` in place."""
    scores = torch.matmul(q, k.transpose(-1, -2))
    positions.add_scores_(q, scores)
    probs = _exp_(scores.float().add_(log_mask[..., -scores.size(-1) :]).sub_(lse))
    grad_scores = torch.matmul(grad, v.transpose(-1, -2)).float().sub_(delta).mul_(probs)  # dS
    grad_v = torch.matmul(probs.to(grad.dtype).transpose(-1, -2), grad)
    del probs, scores
    grad_remaining = None
    if span_gradient:  # d log m = dS, summed over the heads where they share the mask
        remaining = mask.remaining[..., -grad_scores.size(-1) :]  # B x K' x 2M
        grad_log_mask = grad_scores.sum(1, keepdim=True) if remaining.size(1) == 1 else grad_scores
        recent_mask = _block_soft_mask(remaining, mask.block_size, mask.ramp)
        grad_remaining = _ramp_gradient(grad_log_mask, recent_mask, mask.ramp)
    grad_s = grad_scores.to(q.dtype)
    del grad_scores
    grad_q, grad_table = positions.backward(q, grad_s)
    grad_q = grad_q.add_(torch.matmul(grad_s, k))
    grad_k = torch.matmul(grad_s.transpose(-1, -2), q)
    return grad_q, grad_k, grad_v, grad_table, grad_remaining


def _far_ramp_gradient(q, k, v, grad, delta, lse, remaining, block_size: int, ramp: int) -> Tensor:
    """``d r_i`` of the older keys (B x K' x A) from the keys whose ramp meets the block only (at most R
    queries each): their scores are rebuilt, M keys at a time or fewer (:data:`BACKWARD_BLOCK_ELEMENTS`), for
    ``dS = P (dO . v - delta)``.

    Which keys those are depends on the data: one host sync per layer in the backward.
    """
    B, K, M, D = q.shape
    shared = remaining.size(1) == 1
    # a query 0 <= t < M with r < t < r + R (loosely: the exact test is the mask's own, in _ramp_gradient)
    meets = (remaining > -ramp - 1) & (remaining < M)  # B x K' x A
    index, real = (x.view(*remaining.shape[:2], -1) for x in _survivors(meets.flatten(0, 1)))  # B x K' x n
    grad_remaining = torch.zeros_like(remaining)
    step = max(1, min(M, BACKWARD_BLOCK_ELEMENTS // (B * K * M)))
    for start in range(0, index.size(-1), step):
        chunk, real_chunk = index[..., start : start + step], real[..., start : start + step]  # B x K' x c
        rows = chunk.unsqueeze(-1).expand(B, K, -1, D)  # B x K x c x D
        k_chunk, v_chunk = k.gather(2, rows), v.gather(2, rows)
        r_chunk = remaining.gather(-1, chunk)
        mask = _block_soft_mask(r_chunk, M, ramp)  # B x K' x M x c
        log_mask = _block_log_soft_mask(r_chunk, M, ramp)
        probs = _exp_(torch.matmul(q, k_chunk.transpose(-1, -2)).float().add_(log_mask).sub_(lse))  # B K M c
        grad_scores = torch.matmul(grad, v_chunk.transpose(-1, -2)).float().sub_(delta).mul_(probs)
        grad_chunk = _ramp_gradient(grad_scores.sum(1, keepdim=True) if shared else grad_scores, mask, ramp)
        grad_remaining.scatter_add_(-1, chunk, torch.where(real_chunk, grad_chunk, 0.0))
    return grad_remaining


@functools.lru_cache(maxsize=8)
def _not_before(block_size: int, device) -> Tensor:
    """M x M, True where block key j is not before query t (j >= t)."""
    return torch.ones(block_size, block_size, dtype=torch.bool, device=device).triu()


def _survivors(keep: Tensor):
    """Per-stream compaction of ``keep`` (B x N): the index of each stream's surviving entries in order
    (B x kept, padding where a stream has fewer) and which slots are real (B x kept)."""
    B, N = keep.shape
    count = keep.sum(1)  # B
    kept = int(count.max()) if N else 0
    rank = torch.arange(1, kept + 1, device=keep.device).expand(B, -1).contiguous()
    index = torch.searchsorted(keep.cumsum(1), rank).clamp(max=max(N - 1, 0))  # slot s: the (s+1)-th survivor
    return index, rank <= count.unsqueeze(1)


def _select_rows(source: Tensor, index: Tensor) -> Tensor:
    """``source[b, index[b]]`` (B x N x ... -> B x N' x ...) as rows of the flattened batch: index_select copies
    whole rows, a gather would index every element."""
    B, N = source.shape[:2]
    rows = (index + torch.arange(B, device=index.device).unsqueeze(1) * N).flatten()
    return source.flatten(0, 1).index_select(0, rows).view(B, -1, *source.shape[2:])


def update_memory(
    memory: LayerMemory,
    block: Tensor,
    projected: Projection,
    rule: SpanRule,
    span_limit: Optional[float] = None,
    cache_projection: bool = False,
) -> LayerMemory:
    """Delete memories no query of the next block can see (:func:`alive`, at ``d' = d + M``); append the block;
    shift distances by M.

    The block itself is always kept (it is the next block's "previous block"). So a layer never holds more than
    L + R - 1 entries. ``projected`` is the projection of [memory ; block] the attention used; with
    ``cache_projection`` (evaluation) the surviving part is kept so the next block need not recompute it.
    """
    B, M, _ = block.shape
    N = len(memory)
    next_distance = memory.distance + M  # B x N
    spans = projected.spans[:, :N] if rule.learned else None
    keep = memory.valid & alive(spans, next_distance, rule, span_limit)

    # one row selection over [memory ; block]: slot s < kept takes the stream's (s+1)-th surviving entry
    # (padding, marked invalid, where a stream has fewer), slot kept + j the block's entry j
    survivors, real = _survivors(keep)
    index = torch.cat([survivors, torch.arange(N, N + M, device=block.device).expand(B, -1)], dim=1)

    def select(source: Tensor) -> Tensor:  # B x (N + M) x ... -> B x (kept + M) x ...
        return _select_rows(source, index)

    projection = hidden = None
    if cache_projection:  # the hidden states are only needed to project them again
        projection = Projection(
            *(select(x.detach()) if x is not None else None for x in vars(projected).values())
        )
    else:
        hidden = select(torch.cat([memory.hidden, block.detach()], dim=1))
    block_distance = _block_distances(M, block.device).add(M).expand(B, -1)
    return LayerMemory(
        hidden=hidden,
        distance=select(torch.cat([next_distance, block_distance], dim=1)),
        valid=torch.cat([real, keep.new_ones(B, M)], dim=1),
        projection=projection,
    )


@dataclass
class StepMemory:
    """What one layer remembers of each stream while tokens come one at a time (evaluation only).

    Unlike :class:`LayerMemory` there is no block layout: the position term is looked up by distance, so every
    memory is deleted the step no later query can see it, and a layer holds at most L + R - 1 entries.
    """

    keys: Tensor  # B x N x H
    values: Tensor  # B x N x H
    spans: Optional[Tensor]  # B x N   e_i (fp32; None for fixed spans)
    distance: Tensor  # B x N   distance to the next query (fp32, >= 1)
    valid: Tensor  # B x N   False for padding

    @classmethod
    def after_blocks(cls, memory: LayerMemory, past: Projection) -> "StepMemory":
        """The memory left by whole blocks, ``past`` its projection: the next query is the next block's first."""
        return cls(past.keys, past.values, past.spans, memory.distance, memory.valid)

    def __len__(self) -> int:
        return self.distance.size(1)

    def advance(self, now: Projection, rule: SpanRule, span_limit: Optional[float]) -> "StepMemory":
        """Append the token just read (``now``, B x 1), one step further for everyone, and delete what the next
        query cannot see (:func:`alive`; the new token always survives its first step)."""
        B = now.keys.size(0)
        distance = torch.cat([self.distance, self.distance.new_zeros(B, 1)], dim=1) + 1  # B x (N + 1)
        valid = torch.cat([self.valid, self.valid.new_ones(B, 1)], dim=1)
        keys, values = torch.cat([self.keys, now.keys], 1), torch.cat([self.values, now.values], 1)
        spans = torch.cat([self.spans, now.spans], 1) if rule.learned else None
        keep = valid & alive(spans, distance, rule, span_limit)
        if bool(keep.all()):
            return StepMemory(keys, values, spans, distance, valid)
        index, real = _survivors(keep)
        select = functools.partial(_select_rows, index=index)
        return StepMemory(
            select(keys), select(values), select(spans) if rule.learned else None, select(distance), real
        )


def select_streams(memory, order: Tensor):
    """The memory (:class:`LayerMemory` or :class:`StepMemory`) of streams ``order``, in that order: beam search
    reorders and drops hypotheses, and each carries its own memory."""
    changes = {}
    for name, value in vars(memory).items():
        if isinstance(value, Tensor):
            changes[name] = value.index_select(0, order)
        elif dataclasses.is_dataclass(value):
            changes[name] = select_streams(value, order)
    return dataclasses.replace(memory, **changes)
