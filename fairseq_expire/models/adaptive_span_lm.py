"""``adaptive_span_lm``: the Adaptive-Span baseline (Sukhbaatar et al., 2019) in the shared decoder.

Every head learns one span ``z`` in [0, L]; the criterion adds ``--adaptive-span-loss`` times the L1 norm of the
spans (mean over heads, summed over layers, per batch as the reference). Memories beyond the largest span of a
layer are deleted, so the cost follows the learned spans.
"""

from dataclasses import dataclass, field

import torch
from fairseq.models import register_model, register_model_architecture

from fairseq_expire.models.expire_span_lm import (
    AT_LEAST_ONE,
    ExpireSpanDecoder,
    FixedSpanLanguageModel,
    FixedSpanLMConfig,
    _set_defaults,
    attention_kernel,
    enwik8_layers,
    tiny_layers,
)
from fairseq_expire.modules.adaptive_span import AdaptiveSpanAttention
from fairseq_expire.modules.expire_span import SpanRule


@dataclass
class AdaptiveSpanLMConfig(FixedSpanLMConfig):
    adaptive_span_ramp: int = field(default=32, metadata={"help": "ramp length R of the soft mask m_z"})
    adaptive_span_init: float = field(
        default=0.0, metadata={"help": "initial span of every head as a fraction of L (Adaptive-Span: 0)"}
    )


class AdaptiveSpanDecoder(ExpireSpanDecoder):
    """The shared decoder with a learned span per head; reports the spans and their L1 loss."""

    def span_rule(self, cfg, learned_spans: bool) -> SpanRule:
        return SpanRule(cfg.max_span, cfg.adaptive_span_ramp, learned=True)

    def build_attention(self, cfg) -> AdaptiveSpanAttention:
        H, K, dropout = cfg.decoder_embed_dim, cfg.decoder_attention_heads, cfg.attention_dropout
        kernel = attention_kernel(cfg)
        return AdaptiveSpanAttention(
            H, K, self.rule, cfg.adaptive_span_init, attention_dropout=dropout, kernel=kernel
        )

    def head_spans(self) -> torch.Tensor:
        """layers x K: every head's span z."""
        return torch.stack([layer.attention.span_predictor.spans() for layer in self.layers])

    def extract_features(self, src_tokens, reset_memory: bool = False, **unused):
        if self.training:  # the projection of the last update, before the spans are used
            for layer in self.layers:
                layer.attention.span_predictor.project_()
        x, extra = super().extract_features(src_tokens, reset_memory=reset_memory)
        z = self.head_spans()
        extra["adaptive_span_loss"] = z.mean(-1).sum()  # L1 of z (z >= 0)
        extra["head_spans"] = z.detach()
        return x, extra


@register_model("adaptive_span_lm", dataclass=AdaptiveSpanLMConfig)
class AdaptiveSpanLanguageModel(FixedSpanLanguageModel):
    """Adaptive-Span: one learned span per head, the memory trimmed to the largest."""

    learned_spans = True
    decoder_class = AdaptiveSpanDecoder
    option_rules = {
        "adaptive_span_ramp": AT_LEAST_ONE,
        "adaptive_span_init": ("in [0, 1] (a fraction of --max-span)", lambda v: 0 <= v <= 1),
    }


@register_model_architecture("adaptive_span_lm", "adaptive_span_lm_enwik8")
def adaptive_span_lm_enwik8(args):
    """The paper's Adaptive-Span baseline on enwik8 (Table 4): expire_span_lm_enwik8's Transformer-XL with a span
    per head, L = 16K, R = 32 (Adaptive-Span's ramp)."""
    _set_defaults(args, max_span=16384, adaptive_span_ramp=32)
    enwik8_layers(args)


@register_model_architecture("adaptive_span_lm", "adaptive_span_lm_tiny")
def adaptive_span_lm_tiny(args):
    """For tests and the demo corpus: 2 layers, 32 wide, L = 64, R = 8."""
    _set_defaults(args, max_span=64, adaptive_span_ramp=8)
    tiny_layers(args)
