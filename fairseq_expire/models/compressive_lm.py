"""``compressive_lm``: the Compressive Transformer baseline (Rae et al., 2020), mean pooling, no reconstruction
loss (the version the paper compares), in the shared decoder.

Every layer attends over [n_cmem compressed ; n_mem raw ; block]; a compressed memory is the mean of c positions
that left the raw window. Keys of memories are projected again every block, in evaluation too: a compressed
memory's key is the key of its pooled hidden state.
"""

from dataclasses import dataclass, field

from fairseq.models import register_model, register_model_architecture

from fairseq_expire.errors import UsageError
from fairseq_expire.models.expire_span_lm import (
    AT_LEAST_ONE,
    ExpireSpanDecoder,
    FixedSpanLanguageModel,
    MemoryLMConfig,
    _set_defaults,
    enwik8_layers,
    tiny_layers,
)
from fairseq_expire.modules.compressive import compress_memory
from fairseq_expire.modules.expire_span import SpanRule


@dataclass
class CompressiveLMConfig(MemoryLMConfig):
    mem_size: int = field(
        default=512, metadata={"help": "n_mem: raw past positions per layer (at least --tokens-per-sample)"}
    )
    cmem_size: int = field(default=2048, metadata={"help": "n_cmem: compressed memories per layer"})
    compression_rate: int = field(
        default=4, metadata={"help": "c: positions pooled (mean) into one compressed memory (paper: 4)"}
    )


def reach(cfg) -> int:
    """The farthest distance t - i a query attends: n_mem + c * n_cmem from the block's first query, M - 1
    more from its last (a compressed memory sits at the mean distance of its positions)."""
    return cfg.mem_size + cfg.compression_rate * cfg.cmem_size + cfg.tokens_per_sample - 1


class CompressiveDecoder(ExpireSpanDecoder):
    """The shared decoder with a compressive memory: a fixed-span mask that sees every entry kept."""

    accepts_inference_max_span = False  # no span to cap: what is kept is set by n_mem, n_cmem and c

    def __init__(self, cfg, dictionary, learned_spans: bool = False):
        super().__init__(cfg, dictionary, learned_spans)
        self.memory_sizes = (cfg.mem_size, cfg.cmem_size, cfg.compression_rate)  # n_mem, n_cmem, c

    def span_rule(self, cfg, learned_spans: bool) -> SpanRule:
        return SpanRule(reach(cfg), 0, learned=False)

    def update_layer_memory(self, memory, block, projected, span_limit, cache: bool):
        return compress_memory(memory, block, *self.memory_sizes)

    def _read_token(self, token, state):
        """Memories are compressed a block at a time, so there is no token-by-token step to match block
        processing; prompts in whole blocks are read."""
        raise UsageError(
            "compressive_lm has no token-by-token decoding (its memories are compressed a block at a time): "
            "generate with expire_span_lm, fixed_span_lm or adaptive_span_lm"
        )


@register_model("compressive_lm", dataclass=CompressiveLMConfig)
class CompressiveLanguageModel(FixedSpanLanguageModel):
    """Compressive Transformer: the last n_mem positions plus n_cmem means of c older ones."""

    decoder_class = CompressiveDecoder
    option_rules = {"compression_rate": AT_LEAST_ONE, "cmem_size": ("an integer >= 0", lambda v: v >= 0)}

    @classmethod
    def check_options(cls, cfg) -> None:
        super().check_options(cfg)
        M, c = cfg.tokens_per_sample, cfg.compression_rate
        if cfg.mem_size < M:
            raise UsageError(
                f"--mem-size {cfg.mem_size} is shorter than --tokens-per-sample {M}: the previous block is always "
                f"attended. Use --mem-size >= {M}."
            )
        if M % c or cfg.mem_size % c:
            raise UsageError(
                f"--compression-rate {c} must divide --tokens-per-sample {M} and --mem-size {cfg.mem_size}: "
                "positions leave the raw memory a block at a time and are pooled in whole groups of c"
            )


@register_model_architecture("compressive_lm", "compressive_lm_enwik8")
def compressive_lm_enwik8(args):
    """The paper's Compressive Transformer baseline (Table 4, A.2): expire_span_lm_enwik8's Transformer-XL with
    512 raw memories and 2K compressed by 4 (8.5K reach)."""
    _set_defaults(args, mem_size=512, cmem_size=2048, compression_rate=4)
    enwik8_layers(args)


@register_model_architecture("compressive_lm", "compressive_lm_tiny")
def compressive_lm_tiny(args):
    """For tests and the demo corpus: 2 layers, 32 wide, 16 raw memories and 8 compressed by 4."""
    _set_defaults(args, mem_size=16, cmem_size=8, compression_rate=4)
    tiny_layers(args)
