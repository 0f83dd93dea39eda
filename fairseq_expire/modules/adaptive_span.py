"""Adaptive-Span attention (Sukhbaatar et al., ACL 2019), the paper's baseline with a learned span per head.

Head k has a span ``z_k`` in [0, L], a parameter (the same for every input); the soft mask on the distance
``x = t - i`` is ``m_z(x) = clamp((R + z - x) / R, 0, 1)``: Expire-Span's law ``clamp(1 + (e_i - x) / R, 0, 1)``
with ``e_i`` replaced by ``z_k``, so both share the mask and its gradient (:class:`_LogSoftMask`). A memory is
deleted when no head can reach it any more: the memory follows ``max_k z_k + R``.
"""

import dataclasses

import torch
import torch.nn as nn
from torch import Tensor

from fairseq_expire.modules.expire_span import ExpireSpanAttention, SoftMask, SpanRule


class HeadSpans(nn.Module):
    """``z_k = L * f_k``, one fraction ``f_k`` in [0, 1] per head (the Adaptive-Span parametrization)."""

    def __init__(self, num_heads: int, max_span: int, init_fraction: float):
        super().__init__()
        self.max_span = max_span
        self.fraction = nn.Parameter(torch.full((num_heads,), float(init_fraction)))

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp ``f`` into [0, 1] before it is used (projected gradient, as the reference clamps after every
        update): a span pushed below 0 comes back to 0, where it still gets the gradient that lets it grow."""
        self.fraction.clamp_(0.0, 1.0)

    def spans(self) -> Tensor:  # K, fp32
        """In training ``f`` is already in [0, 1] (the clamp passes its gradient there, bounds included); in
        evaluation the clamp covers weights saved after an update that left [0, 1]."""
        return self.max_span * self.fraction.float().clamp(0.0, 1.0)

    def forward(self, hidden: Tensor) -> Tensor:
        """B x T x H -> B x T: the largest head span for every position, which decides what the memory keeps."""
        return self.spans().detach().amax().expand(hidden.shape[:2])


class AdaptiveSpanAttention(ExpireSpanAttention):
    """:class:`ExpireSpanAttention` with a mask per head from :class:`HeadSpans` and no Expire-Span loss (the
    L1 loss on ``z`` is the decoder's)."""

    def __init__(self, hidden_size: int, num_heads: int, rule: SpanRule, init_fraction: float, **options):
        """``init_fraction``: every head's initial span z / L; ``options``: the attention's dropout and kernel."""
        # built as a fixed-span attention (no span predictor), then given the per-head spans
        super().__init__(hidden_size, num_heads, dataclasses.replace(rule, learned=False), **options)
        self.rule = rule
        self.span_predictor = HeadSpans(num_heads, rule.max_span, init_fraction)

    def span_mask(self, spans, far, block_size: int, span_limit, causal: bool) -> SoftMask:
        """``m_z`` per head: ``r = z_k - x`` seen from the block's first query (B x K x T)."""
        z = self.span_predictor.spans()
        z = (z if span_limit is None else z.clamp(max=span_limit)).view(1, -1, 1)  # 1 x K x 1
        return SoftMask(z - far.unsqueeze(1), block_size, self.rule.ramp, causal)

    def span_loss(self, spans, first_distance, valid, block_size: int, span_limit):
        """None of Expire-Span's: the L1 loss on ``z`` is the decoder's."""
        return first_distance.new_zeros(())
