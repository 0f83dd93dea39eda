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


def _query_offsets(block_size: int, device) -> Tensor:
    """M x 1: how much further each query of the block is from every key than the first query is (t = 0..M-1)."""
    return torch.arange(block_size, dtype=torch.float32, device=device).unsqueeze(1)


def _block_soft_mask(remaining_first: Tensor, block_size: int, ramp: int) -> Tensor:
    """``m_{t,i}`` for the block's queries from ``r_i`` seen from its first query: ... x T -> ... x M x T
    (B x T for a span per key, B x K x T for a span per head).

    Query t sees ``r_i - t``; ``1 + (r_i - t) / R`` is one subtraction per element from a per-key term.
    """
    offsets = _query_offsets(block_size, remaining_first.device) / ramp  # M x 1
    # m = clamp(1 + r / R, 0, 1)
    return ((remaining_first / ramp + 1).unsqueeze(-2) - offsets).clamp_(0.0, 1.0)


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
        return _block_soft_mask(remaining_first, block_size, ramp).log_()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (remaining_first,) = ctx.saved_tensors
        mask = _block_soft_mask(remaining_first, ctx.block_size, ctx.ramp)
        on_ramp = (mask > 0) & (mask < 1)
        return torch.where(on_ramp, grad / mask, 0.0).sum(-2) / ctx.ramp, None, None


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
        # the band's (t, j) is (t, t + j) of scores: one row and one column further per t
        row, column = scores.stride()[-2:]
        strides = (*scores.stride()[:-2], row + column, column)
        scores.as_strided(band.shape, strides, scores.storage_offset()).add_(band)

    def scores_at(self, query: Tensor, distance: Tensor) -> Tensor:
        """``q . p_d`` for one query (B x K x 1 x D) and keys at distance d (B x N, any layout): B x K x 1 x N,
        0 outside distances 1..M (older memories get no position term, as in block processing)."""
        B, K = query.shape[:2]
        table = torch.matmul(query, self.weight.to(query.dtype))  # B x K x 1 x M, column c: d = c + 1
        index = (distance.long() - 1).clamp(0, self.block_size - 1)  # B x N
        scores = table.gather(-1, index[:, None, None, :].expand(B, K, 1, -1))
        near = (distance >= 1) & (distance <= self.block_size)
        return scores * near[:, None, None, :]


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
        far = first_distance.masked_fill(~valid, math.inf)  # padding is infinitely far, so it gets m = 0

        keys = Projection(
            torch.cat([past.keys, now.keys], dim=1),  # B x T x H
            torch.cat([past.values, now.values], dim=1),
            torch.cat([past.spans, now.spans], dim=1) if self.rule.learned else None,  # B x T, fp32
        )
        log_mask, aux, last_visible = self.span_mask(keys.spans, first_distance, far, valid, M, span_limit)
        if log_mask.dim() == 3:  # shared by the heads
            log_mask, last_visible = log_mask.unsqueeze(1), last_visible.unsqueeze(1)
        # causal, self excluded: block key j is visible from query t only if j < t
        log_mask[..., -M:].masked_fill_(_not_before(M, block.device), -math.inf)
        # B x K' x M x 1: False only at a stream's start. Applied unconditionally: testing for it first would
        # stall a GPU's queue once per layer (host sync) to save one pass over the mask.
        sees_something = log_mask.amax(-1, keepdim=True) > -math.inf
        log_mask.masked_fill_(~sees_something, 0.0)

        q = self._heads(self.q_proj(block)) * self.head_dim**-0.5  # B x K x M x D
        k, v = self._heads(keys.keys), self._heads(keys.values)  # B x K x T x D
        # s = q.(k + p_{t-i}) / sqrt(D), the position term only for the previous and current block;
        # a' = m exp(s) / sum_j m exp(s_j) = softmax(s + log m)
        if torch.is_grad_enabled():
            # the position term goes into its own part: autograd would copy all of B x K x M x T back through
            # an in-place add to a view
            scores = torch.cat(
                [
                    torch.matmul(q, k[:, :, : -2 * M].transpose(-1, -2)),
                    torch.matmul(q, k[:, :, -2 * M :].transpose(-1, -2)) + positions.scores(q),
                ],
                dim=-1,
            )  # B x K x M x T
            out = torch.matmul(self.dropout(_SoftmaxInFloat.apply(scores, log_mask)), v)  # B x K x M x D
        else:
            out = fused_attention(q, k, v, log_mask, positions, self.dropout.p if self.training else 0.0)
        out = out * sees_something
        out = out.transpose(1, 2).reshape(B, M, -1)  # B x M x H

        with torch.no_grad():  # |C_t|: key i is visible to the queries max(0, 1 - d_i) <= t <= last_visible_i
            first_visible = (1 - first_distance).clamp(min=0).unsqueeze(1)  # B x 1 x T
            seen_by = (last_visible.clamp(max=M - 1) - first_visible + 1).clamp(min=0) * valid.unsqueeze(1)
            attended = seen_by.sum() / (B * M * seen_by.size(1))  # mean over queries (and heads)
        return self.out_proj(out), keys, aux, attended

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
        # the block's mask for a block of one query: B x 1 x N, or B x K x 1 x N per head
        log_mask, _, _ = self.span_mask(memory.spans, memory.distance, far, memory.valid, 1, span_limit)
        if log_mask.dim() == 3:  # shared by the heads
            log_mask = log_mask.unsqueeze(1)
        sees_something = (log_mask > -math.inf).any(
            -1, keepdim=True
        )  # B x K' x 1 x 1: False at a stream's start

        q = self._heads(self.q_proj(token)) * self.head_dim**-0.5  # B x K x 1 x D
        k, v = self._heads(memory.keys), self._heads(memory.values)  # B x K x N x D
        # s = q.(k + p_{t-i}) / sqrt(D), the position term for distances 1..M; a' = softmax(s + log m)
        scores = (torch.matmul(q, k.transpose(-1, -2)) + positions.scores_at(q, memory.distance)).float()
        attn = torch.softmax(scores + log_mask.masked_fill(~sees_something, 0.0), dim=-1)  # B x K x 1 x N
        out = torch.matmul(self.dropout(attn).to(v.dtype), v) * sees_something  # B x K x 1 x D
        out = out.transpose(1, 2).reshape(B, 1, -1)  # B x 1 x H
        return self.out_proj(out), memory.advance(self.project(token), self.rule, span_limit)

    def span_mask(self, spans, first_distance, far, valid, block_size: int, span_limit: Optional[float]):
        """``log m`` of the block's queries over all T keys, before causality (B x M x T, or B x K x M x T for a
        mask per head), the span loss (None: no loss) and, per key, the last query that sees it (B x T, or
        B x K x T). ``far`` is ``first_distance`` with padding at infinity."""
        M = block_size
        if self.rule.learned:
            spans = spans if span_limit is None else spans.clamp(max=span_limit)
            log_mask = _LogSoftMask.apply(spans - far, M, self.rule.ramp)  # B x M x T
            aux = ramp_span_loss(spans - first_distance, M, self.rule.ramp).masked_fill(~valid, 0.0).sum()
            last_visible = (
                torch.ceil(spans.detach() + self.rule.ramp - first_distance) - 1
            )  # m > 0: t - i < e + R
            return log_mask, aux, last_visible
        limit = self.rule.max_span if span_limit is None else min(self.rule.max_span, span_limit)
        too_far = far.unsqueeze(1) + _query_offsets(M, far.device) > limit  # B x M x T: t - i > L
        log_mask = torch.zeros(too_far.shape, device=far.device).masked_fill_(too_far, -math.inf)
        return log_mask, None, torch.floor(limit - first_distance)  # m > 0: t - i <= L


# The CPU flash kernel behind scaled_dot_product_attention, called directly for its log-sum-exp (the public
# function does not return it). Where it is missing, or on other devices, attention takes the plain fused path.
_CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"


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
    if q.device.type == "cpu" and k.size(-2) > 2 * q.size(-2) and hasattr(torch.ops.aten, _CPU_FLASH):
        return _split_flash_attention(q, k, v, log_mask, positions, dropout_p)
    return _whole_bias_attention(q, k, v, log_mask, positions, dropout_p)


def _whole_bias_attention(q, k, v, log_mask, positions, dropout_p):
    """The plain fused path: one call, with log m copied to every head and the position term added."""
    B, K, M, _ = q.shape
    bias = q.new_empty(B, K, M, log_mask.size(-1)).copy_(log_mask)  # B x K x M x T
    positions.add_scores_(q, bias[..., -2 * M :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=1.0)


def _split_flash_attention(q, k, v, log_mask, positions, dropout_p):
    """The older memories' keys (all but the last 2M) have no position term, so their bias is log m, shared by
    the heads where it is (B x 1 x M x A, broadcast by the kernel, never copied K times). The two parts go through the CPU
    flash kernel separately, and are merged by their log-sum-exps:
    ``o = (e^{lse_old} o_old + e^{lse_recent} o_recent) / (e^{lse_old} + e^{lse_recent})``.
    """
    B, K, M, _ = q.shape
    old = k.size(-2) - 2 * M
    recent_bias = q.new_empty(B, K, M, 2 * M).copy_(log_mask[..., old:])  # B x K x M x 2M
    positions.add_scores_(q, recent_bias)
    parts = [
        _flash_with_log_sum_exp(q, k[:, :, :old], v[:, :, :old], log_mask[..., :old], None, dropout_p),
        _flash_with_log_sum_exp(q, k[:, :, old:], v[:, :, old:], log_mask[..., old:], recent_bias, dropout_p),
    ]
    total = torch.logaddexp(parts[0][1], parts[1][1])  # B x K x M
    return sum(out * (lse - total).exp().unsqueeze(-1).to(out.dtype) for out, lse in parts)


def _flash_with_log_sum_exp(q, k, v, log_mask, bias, dropout_p):
    """Output and log-sum-exp (B x K x M, fp32) of the CPU flash kernel over keys with mask ``log_mask``
    (B x K' x M x T'), and the per-head ``bias`` if given (else log m); lse = -inf for a row that sees none of
    these keys (the kernel gives 0 there)."""
    bias = log_mask if bias is None else bias
    out, lse = getattr(torch.ops.aten, _CPU_FLASH)(
        q, k, v, dropout_p, False, attn_mask=bias.to(q.dtype), scale=1.0
    )
    sees_nothing = log_mask.amax(-1) == -math.inf  # B x K' x M
    return out, lse.masked_fill(sees_nothing, -math.inf)


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
    keys: Projection,
    rule: SpanRule,
    span_limit: Optional[float] = None,
    cache_projection: bool = False,
) -> LayerMemory:
    """Delete memories no query of the next block can see (:func:`alive`, at ``d' = d + M``); append the block;
    shift distances by M.

    The block itself is always kept (it is the next block's "previous block"). So a layer never holds more than
    L + R - 1 entries. ``keys`` is the projection of [memory ; block] the attention used; with
    ``cache_projection`` (evaluation) the surviving part is kept so the next block need not recompute it.
    """
    B, M, _ = block.shape
    N = len(memory)
    next_distance = memory.distance + M  # B x N
    spans = keys.spans[:, :N] if rule.learned else None
    keep = memory.valid & alive(spans, next_distance, rule, span_limit)

    # one row selection over [memory ; block]: slot s < kept takes the stream's (s+1)-th surviving entry
    # (padding, marked invalid, where a stream has fewer), slot kept + j the block's entry j
    survivors, real = _survivors(keep)
    index = torch.cat([survivors, torch.arange(N, N + M, device=block.device).expand(B, -1)], dim=1)

    def select(source: Tensor) -> Tensor:  # B x (N + M) x ... -> B x (kept + M) x ...
        return _select_rows(source, index)

    projection = hidden = None
    if cache_projection:  # the hidden states are only needed to project them again
        projection = Projection(*(select(x.detach()) if x is not None else None for x in vars(keys).values()))
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
