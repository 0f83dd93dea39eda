"""``expire_span_lm`` (Expire-Span) and ``fixed_span_lm`` (its Transformer-XL baseline) for fairseq.

Both share one decoder; the only difference is the :class:`SpanRule` deciding how long memories live
(paper 5.1: "the only difference among them is how memories are handled"). The mechanism itself lives in
:mod:`fairseq_expire.modules.expire_span`; this module is the fairseq glue: options, presets, the per-stream
memory that persists across forward calls, and the statistics the criterion logs.
"""

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import options
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import (
    FairseqIncrementalDecoder,
    FairseqLanguageModel,
    register_model,
    register_model_architecture,
)
from fairseq.modules import AdaptiveInput, AdaptiveSoftmax
from omegaconf import II

from fairseq_expire.data.streams import dictionary_fingerprint
from fairseq_expire.errors import UsageError
from fairseq_expire.modules.expire_span import (
    ExpireSpanAttention,
    LayerMemory,
    Projection,
    RelativePositionTable,
    SpanRule,
    StepMemory,
    select_streams,
    update_memory,
)

logger = logging.getLogger(__name__)


@dataclass
class MemoryLMConfig(FairseqDataclass):
    """What every model with a per-stream memory has (they differ in how memories are kept)."""

    decoder_layers: int = field(default=12, metadata={"help": "number of layers"})
    decoder_embed_dim: int = field(default=512, metadata={"help": "model width H"})
    decoder_ffn_embed_dim: int = field(default=2048, metadata={"help": "feed-forward hidden size"})
    decoder_attention_heads: int = field(default=8, metadata={"help": "attention heads K (D = H / K)"})
    dropout: float = field(default=0.3, metadata={"help": "dropout on the feed-forward hidden layer"})
    attention_dropout: float = field(default=0.3, metadata={"help": "dropout on attention probabilities"})
    attention_kernel: ChoiceEnum(["fused", "plain"]) = field(
        default="fused",
        metadata={
            "help": "training attention: fused = fused kernels with exact gradients, keeping O(B K M D) per "
            "layer instead of the B x K x M x T probabilities (the plain path where attention dropout > 0, "
            "logged); plain = the plain reference path"
        },
    )
    embedding_dropout: float = field(
        default=0.0, metadata={"help": "dropout on the embedding output and the last layer's output"}
    )
    decoder_normalize_before: bool = field(
        default=False, metadata={"help": "pre-norm layers (post-norm, the reference default, when off)"}
    )
    share_decoder_input_output_embed: bool = field(
        default=False, metadata={"help": "tie the output projection to the input embedding"}
    )
    adaptive_input: bool = field(default=False, metadata={"help": "adaptive input embeddings (word level)"})
    adaptive_input_factor: float = field(
        default=4, metadata={"help": "adaptive input: size reduction factor"}
    )
    adaptive_input_cutoff: Optional[str] = field(
        default=None, metadata={"help": "adaptive input: comma-separated vocabulary cutoffs"}
    )
    adaptive_softmax_cutoff: Optional[str] = field(
        default=None, metadata={"help": "adaptive softmax: comma-separated vocabulary cutoffs (word level)"}
    )
    adaptive_softmax_dropout: float = field(default=0.0, metadata={"help": "adaptive softmax: tail dropout"})
    adaptive_softmax_factor: float = field(
        default=4, metadata={"help": "adaptive softmax: size reduction factor"}
    )
    tie_adaptive_weights: bool = field(
        default=False, metadata={"help": "share adaptive input and adaptive softmax weights"}
    )
    tokens_per_sample: int = II("task.tokens_per_sample")


@dataclass
class FixedSpanLMConfig(MemoryLMConfig):
    max_span: int = field(
        default=16384, metadata={"help": "maximum span L: how far back a memory can ever be attended"}
    )
    inference_max_span: Optional[int] = field(
        default=None,
        metadata={
            "help": "evaluation only: cap every span at this many steps and delete memories accordingly "
            "(paper Figure 10); set it with --model-overrides \"{'inference_max_span': 1024}\""
        },
    )


@dataclass
class ExpireSpanLMConfig(FixedSpanLMConfig):
    expire_span_ramp: int = field(default=128, metadata={"help": "ramp length R of the soft mask"})
    expire_span_init_percentage: float = field(
        default=0.1, metadata={"help": "initial span as a fraction p of L (bias = logit(p), weight = 0)"}
    )
    expire_span_pre_div: float = field(
        default=1.0, metadata={"help": "divide hidden states by this before the span predictor"}
    )
    expire_span_noisy: bool = field(
        default=False,
        metadata={"help": "training: each block, cap spans at u*L, u ~ U(0,1), in mask and loss (paper 4.2)"},
    )


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


AT_LEAST_ONE = ("an integer >= 1", lambda v: v >= 1)
PROBABILITY = ("in [0, 1)", lambda v: 0 <= v < 1)


def check_option_rules(cfg, rules: dict) -> None:
    """``rules``: {option: (allowed, predicate)}; the first value that breaks its rule stops with one line."""
    for name, (allowed, ok) in rules.items():
        value = getattr(cfg, name)
        if not ok(value):
            raise UsageError(f"{_option(name)} {value}: must be {allowed}")


def check_model_options(cfg) -> None:
    """Refuse option values that no model of this plugin can train or evaluate with, before anything is built: one
    line each, with the valid range. Models without ``--max-span`` (their memory is sized otherwise) get the
    shared checks only; each model's own options are its class's ``option_rules``."""
    rules = {
        "decoder_layers": AT_LEAST_ONE,
        "decoder_embed_dim": AT_LEAST_ONE,
        "decoder_ffn_embed_dim": AT_LEAST_ONE,
        "decoder_attention_heads": AT_LEAST_ONE,
        "dropout": PROBABILITY,
        "attention_dropout": PROBABILITY,
        "embedding_dropout": PROBABILITY,
        "adaptive_softmax_dropout": PROBABILITY,
    }
    spans = hasattr(cfg, "max_span")
    if spans:
        rules["max_span"] = AT_LEAST_ONE
    check_option_rules(cfg, rules)
    if spans and cfg.inference_max_span is not None and cfg.inference_max_span < 1:
        raise UsageError(
            f"inference_max_span {cfg.inference_max_span}: the cap on spans at evaluation must be at least 1 "
            "(leave it unset for no cap)"
        )
    if cfg.decoder_embed_dim % cfg.decoder_attention_heads:
        raise UsageError(
            f"--decoder-embed-dim {cfg.decoder_embed_dim} is not divisible by --decoder-attention-heads "
            f"{cfg.decoder_attention_heads}: each head gets H / K dimensions"
        )
    if spans and cfg.tokens_per_sample > cfg.max_span:
        raise UsageError(
            f"--tokens-per-sample {cfg.tokens_per_sample} is longer than --max-span {cfg.max_span}: a block must "
            "fit in the span (the previous block is always attended). Use --max-span >= --tokens-per-sample."
        )


def attention_kernel(cfg) -> str:
    """``--attention-kernel`` (configurations saved before it existed: fused)."""
    return str(getattr(cfg, "attention_kernel", None) or "fused")


class ExpireSpanLayer(nn.Module):
    """Attention over [memory ; block] + feed-forward, post-norm (reference default) or pre-norm."""

    def __init__(self, cfg, attention: ExpireSpanAttention):
        super().__init__()
        H = cfg.decoder_embed_dim
        self.normalize_before = cfg.decoder_normalize_before
        self.attention = attention
        if self.normalize_before:  # keep the residual stream's scale in check with depth (as the reference)
            self.attention.out_proj.weight.data.div_((2 * cfg.decoder_layers) ** 0.5)
        self.attention_norm = nn.LayerNorm(H)
        self.ffn_norm = nn.LayerNorm(H)
        self.fc1 = nn.Linear(H, cfg.decoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.decoder_ffn_embed_dim, H)
        self.dropout = nn.Dropout(cfg.dropout)

    def feed_forward(self, x):
        return self.fc2(self.dropout(F.relu(self.fc1(x))))

    def _norm(self, h):
        """What attention sees: the normalized input in pre-norm layers, the input itself in post-norm ones."""
        return self.attention_norm(h) if self.normalize_before else h

    def _past(self, memory: LayerMemory):
        """The projection of the memory: cached in evaluation, else recomputed with the current weights."""
        return memory.projection or self.attention.project(self._norm(memory.hidden))

    def forward(self, x, memory: LayerMemory, positions, span_limit):
        """x: B x M x H, the layer input. Returns the output, the projection of [memory ; block], the span
        loss and |C_t|."""
        attention_out, projected, span_loss, attn_mem = self.attention(
            self._norm(x), self._past(memory), memory.distance, memory.valid, positions, span_limit
        )
        return self._residual_and_feed_forward(x, attention_out), projected, span_loss, attn_mem

    def step(self, x, memory, positions, span_limit):
        """x: B x 1 x H, one new token per stream; ``memory`` a :class:`StepMemory`, or the :class:`LayerMemory`
        whole blocks left. Returns the output and the memory for the next token."""
        if isinstance(memory, LayerMemory):
            memory = StepMemory.after_blocks(memory, self._past(memory))
        attention_out, memory = self.attention.step(self._norm(x), memory, positions, span_limit)
        return self._residual_and_feed_forward(x, attention_out), memory

    def _residual_and_feed_forward(self, x, attention_out):
        if self.normalize_before:
            h = x + attention_out
            return h + self.feed_forward(self.ffn_norm(h))
        h = self.attention_norm(x + attention_out)
        return self.ffn_norm(h + self.feed_forward(h))


@dataclass
class DecodingState:
    """One generation's streams (fairseq's incremental state): per layer, the :class:`LayerMemory` whole blocks
    left (while only whole blocks were read), then the :class:`StepMemory` of token-by-token reading."""

    memories: Optional[list] = None  # None: nothing read yet
    length: int = 0  # tokens read per stream

    def in_blocks(self) -> bool:
        return self.memories is None or isinstance(self.memories[0], LayerMemory)

    def mem_per_layer(self) -> Optional[torch.Tensor]:
        """Entries kept per layer, mean over streams (None before anything is read)."""
        if self.memories is None:
            return None
        return torch.stack([memory.valid.sum(1).float().mean() for memory in self.memories])


class ExpireSpanDecoder(FairseqIncrementalDecoder):
    """Decoder whose layers keep a per-stream memory from one forward call (block) to the next.

    The memory is a plain attribute (not a buffer: never saved, never broadcast), kept separately for training
    and evaluation so that validation never disturbs the training streams. Generation keeps its own memory in a
    :class:`DecodingState` instead (fairseq's ``incremental_state``).
    """

    accepts_inference_max_span = True  # the evaluation option inference_max_span caps its spans

    def __init__(self, cfg, dictionary, learned_spans: bool):
        super().__init__(dictionary)
        H = cfg.decoder_embed_dim
        self.block_size = cfg.tokens_per_sample
        self.rule = self.span_rule(cfg, learned_spans)
        self.noisy = learned_spans and getattr(cfg, "expire_span_noisy", False)
        self.inference_max_span = getattr(cfg, "inference_max_span", None)
        # saved with the weights, so that every path that loads them can refuse another vocabulary of the same size
        fingerprint = bytes.fromhex(dictionary_fingerprint(dictionary))
        self.register_buffer("dictionary_fingerprint", torch.tensor(list(fingerprint), dtype=torch.long))
        pad = dictionary.pad()
        if cfg.adaptive_input:
            self.embed_tokens = AdaptiveInput(
                len(dictionary),
                pad,
                H,
                cfg.adaptive_input_factor,
                H,
                options.eval_str_list(cfg.adaptive_input_cutoff, type=int),
            )
        else:
            self.embed_tokens = nn.Embedding(len(dictionary), H, padding_idx=pad)
            nn.init.normal_(self.embed_tokens.weight, mean=0, std=H**-0.5)
            nn.init.zeros_(self.embed_tokens.weight[pad])
        self.embedding_dropout = nn.Dropout(cfg.embedding_dropout)
        self.positions = RelativePositionTable(H // cfg.decoder_attention_heads, self.block_size)
        self.layers = nn.ModuleList(
            ExpireSpanLayer(cfg, self.build_attention(cfg)) for _ in range(cfg.decoder_layers)
        )
        self.final_norm = nn.LayerNorm(H) if cfg.decoder_normalize_before else None

        self.adaptive_softmax = None
        self.output_projection = None
        if cfg.adaptive_softmax_cutoff is not None:
            self.adaptive_softmax = AdaptiveSoftmax(
                len(dictionary),
                H,
                options.eval_str_list(cfg.adaptive_softmax_cutoff, type=int),
                cfg.adaptive_softmax_dropout,
                adaptive_inputs=self.embed_tokens if cfg.tie_adaptive_weights else None,
                factor=cfg.adaptive_softmax_factor,
                tie_proj=cfg.tie_adaptive_weights,
            )
        else:
            self.output_projection = nn.Linear(H, len(dictionary))
            if cfg.share_decoder_input_output_embed:
                self.output_projection.weight = self.embed_tokens.weight
        self._memory = {}  # {training: [LayerMemory per layer]}
        # Evaluation keeps the keys, values and spans of memories instead of recomputing them every block (the
        # weights do not change). False gives the plain path, which recomputes them as training does.
        self.cache_projections_in_eval = True

    def span_rule(self, cfg, learned_spans: bool) -> SpanRule:
        """How long memories live (other memory schemes override this and the two methods below)."""
        return SpanRule(cfg.max_span, getattr(cfg, "expire_span_ramp", 0), learned_spans)

    def build_attention(self, cfg) -> ExpireSpanAttention:
        """One layer's attention over [memory ; block]."""
        return ExpireSpanAttention(
            cfg.decoder_embed_dim,
            cfg.decoder_attention_heads,
            self.rule,
            cfg.attention_dropout,
            init_percentage=getattr(cfg, "expire_span_init_percentage", 0.1),
            pre_div=getattr(cfg, "expire_span_pre_div", 1.0),
            kernel=attention_kernel(cfg),
        )

    def update_layer_memory(self, memory, block, projected, span_limit, cache: bool) -> LayerMemory:
        """One layer's memory for the next block, from its memory, its input ``block`` and ``projected``, the
        projection of [memory ; block] its attention used."""
        return update_memory(memory, block, projected, self.rule, span_limit, cache)

    def check_weights(self, state_dict, prefix: str = "decoder.") -> None:
        """Refuse weights trained on another dictionary or block length, naming what differs (fairseq would say
        only "architectures match", or nothing at all for a dictionary of the same size)."""
        table = state_dict.get(prefix + "positions.weight")
        if table is not None and table.size(-1) != self.block_size:
            raise UsageError(
                f"--tokens-per-sample {self.block_size}, but the checkpoint's model was trained with "
                f"--tokens-per-sample {table.size(-1)} (its relative-position table covers one block): use "
                f"--tokens-per-sample {table.size(-1)}"
            )
        # checkpoints written before the fingerprint was saved cannot be checked
        saved = state_dict.setdefault(prefix + "dictionary_fingerprint", self.dictionary_fingerprint)
        if not torch.equal(saved.cpu(), self.dictionary_fingerprint.cpu()):
            raise UsageError(
                "the checkpoint's model was trained with a different dictionary than this data's dict.txt: token "
                "ids would mean other symbols. Use data binarized with the training data's dict.txt "
                "(`fairseq-preprocess --only-source --srcdict TRAINING_DATA/dict.txt ...`)"
            )

    def reset_memory(self):
        """Forget everything, in training and evaluation mode alike."""
        self._memory.clear()

    def memory(self) -> Optional[List[LayerMemory]]:
        """The memory of the current mode (training or evaluation), per layer."""
        return self._memory.get(self.training)

    def set_memory(self, memories: List[LayerMemory]) -> None:
        """Continue the current mode's streams from ``memories`` (one per layer), e.g. a memory kept aside."""
        self._memory[self.training] = list(memories)

    def forward(
        self, src_tokens, src_lengths=None, reset_memory: bool = False, incremental_state=None, **unused
    ):
        """A block of every stream (training, fairseq-eval-lm), with the memory carried from the last call.

        For generation, fairseq's incremental decoding: with ``incremental_state``, ``src_tokens`` are all the
        tokens so far (fairseq's convention) and only those not yet read are read (:meth:`read`). In evaluation, a
        sequence of another length than a block with ``reset_memory`` is one new stream read whole (fairseq's
        scorer: hub ``.score()``).
        """
        if incremental_state is not None:
            state = self.get_incremental_state(incremental_state, "decoding") or DecodingState()
            x, extra = self.read(src_tokens[:, state.length :], state)
            self.set_incremental_state(incremental_state, "decoding", state)
        elif reset_memory and not self.training and src_tokens.size(1) != self.block_size:
            x, extra = self.read(src_tokens, DecodingState())
        else:
            x, extra = self.extract_features(src_tokens, reset_memory=reset_memory)
        return self.output_layer(x), extra

    def read(self, tokens, state: "DecodingState"):
        """Continue the streams of ``state`` with ``tokens`` (B x n), in evaluation: whole blocks go through
        block processing while only whole blocks were read (a prompt), then tokens are read one at a time with
        exactly the same masks, spans and position terms. Returns the features (B x n x H) and, per layer, the
        entries kept (``mem_per_layer``)."""
        if self.training:
            raise UsageError("decoding token by token is for evaluation: call model.eval() first")
        B, n = tokens.shape
        if state.memories is not None and len(state.memories[0].valid) != B:
            raise UsageError(f"{B} streams, but the decoding state holds {len(state.memories[0].valid)}")
        features, start = [], 0
        while state.in_blocks() and n - start >= self.block_size:
            block = tokens[:, start : start + self.block_size]
            x, state.memories, _ = self._read_block(block, state.memories)
            features.append(x)
            start += self.block_size
        for i in range(start, n):
            features.append(self._read_token(tokens[:, i : i + 1], state))
        state.length += n
        x = (
            torch.cat(features, dim=1)
            if features
            else tokens.new_zeros(B, 0, self.embed_tokens.embedding_dim)
        )
        return x, {"attn": None, "mem_per_layer": state.mem_per_layer()}

    def _read_token(self, token, state: "DecodingState"):
        """One token per stream (B x 1) through every layer; the memories become :class:`StepMemory`."""
        x = self.embedding_dropout(self.embed_tokens(token))  # B x 1 x H
        memories = self._current_memory(x, state.memories)
        span_limit, _ = self._span_limits()  # evaluation: the inference cap, in the mask and in deletion
        for i, layer in enumerate(self.layers):
            x, memories[i] = layer.step(x, memories[i], self.positions, span_limit)
        state.memories = memories
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.embedding_dropout(x)

    def reorder_incremental_state(self, incremental_state, new_order):
        """Beam search: every hypothesis carries the memory of the one it continues."""
        state = self.get_incremental_state(incremental_state, "decoding")
        if state is not None and state.memories is not None:
            state.memories = [select_streams(memory, new_order) for memory in state.memories]
            self.set_incremental_state(incremental_state, "decoding", state)

    def output_layer(self, features, **unused):
        if self.adaptive_softmax is not None:
            return features  # the criterion and get_normalized_probs apply the adaptive softmax
        return self.output_projection(features)

    def _span_limits(self):
        """(limit in mask and loss, limit in deletion): the noise u*L in training, the inference cap in eval."""
        if self.training:
            if self.noisy:
                return float(torch.rand(()) * self.rule.max_span), None
            return None, None
        return self.inference_max_span, self.inference_max_span

    def _current_memory(self, x, memories) -> list:
        """``memories`` for the B streams of ``x`` (B x M x H), or empty ones."""
        B, M, H = x.shape
        if memories is not None and memories[0].valid.size(0) != B:
            logger.info(f"batch of {B} streams after {memories[0].valid.size(0)}: memory reset")
            memories = None
        if memories is None:
            memories = [LayerMemory.empty(B, self.block_size, H, like=x) for _ in self.layers]
        return list(memories)

    def extract_features(self, src_tokens, reset_memory: bool = False, **unused):
        B, M = src_tokens.shape
        if M != self.block_size:
            raise UsageError(
                f"block of {M} tokens, but the model was built for --tokens-per-sample {self.block_size}: "
                "use the block length the model was trained with"
            )
        x, self._memory[self.training], extra = self._read_block(
            src_tokens, None if reset_memory else self.memory()
        )
        return x, extra

    def _read_block(self, src_tokens, memories):
        """One block of every stream (B x M) after ``memories`` (None: empty): features, memories, statistics."""
        B, M = src_tokens.shape
        x = self.embedding_dropout(self.embed_tokens(src_tokens))  # B x M x H
        memories = self._current_memory(x, memories)
        mask_limit, deletion_limit = self._span_limits()

        cache = not self.training and self.cache_projections_in_eval
        new_memories, spans_of_block, span_loss, attn_mem, kept = (
            [],
            [],
            x.new_zeros((), dtype=torch.float),
            [],
            [],
        )
        updates = []
        for layer, memory in zip(self.layers, memories):
            out, projected, layer_span_loss, layer_attn_mem = layer(x, memory, self.positions, mask_limit)
            # without the cache the update needs only the spans: holding the keys and values until then would
            # keep every layer's at once
            projected = projected if cache else Projection(None, None, projected.spans)
            updates.append((memory, x, projected))
            attn_mem.append(layer_attn_mem)
            if projected.spans is not None:
                spans_of_block.append(projected.spans[:, -x.size(1) :].detach())
                span_loss = span_loss + layer_span_loss
            x = out
        # The memory's size is data-dependent (what survives): each update reads it on the host. Updating after
        # the whole forward is queued keeps those syncs from draining a GPU's queue between layers.
        for memory, block, projected in updates:
            new_memories.append(self.update_layer_memory(memory, block, projected, deletion_limit, cache))
            kept.append(new_memories[-1].valid.sum(1).float().mean())

        if self.final_norm is not None:
            x = self.final_norm(x)
        x = self.embedding_dropout(x)
        if spans_of_block:
            block_spans = torch.stack(spans_of_block)  # layers x B x M, fp32
        else:  # fixed span: every memory lives exactly L steps
            span = min(self.rule.max_span, deletion_limit or self.rule.max_span)
            block_spans = torch.full((len(self.layers), B, M), float(span), device=x.device)
        extra = {
            "span_loss": span_loss,  # sum over layers and memories of the ramp terms (paper 4.2)
            "spans": block_spans,  # expire-span of each token of the block, per layer
            "span_avg": block_spans.mean(),
            # largest span of each stream's block, mean over streams: unlike a batch maximum, the same figure
            # whichever way the streams are spread over GPUs (logging outputs are summed across ranks)
            "span_max": block_spans.amax(dim=(0, 2)).mean(),
            "mem_per_layer": torch.stack(kept).detach(),  # entries kept per layer, mean over streams
            "attn_mem_avg": torch.stack(attn_mem).mean(),  # paper's |C_t|, mean over layers
        }
        return x, new_memories, extra

    def max_positions(self):
        return None  # streams have no length limit; the block length is the task's --tokens-per-sample


@register_model("fixed_span_lm", dataclass=FixedSpanLMConfig)
class FixedSpanLanguageModel(FairseqLanguageModel):
    """Transformer-XL-style baseline: every layer remembers exactly the last L positions."""

    learned_spans = False
    decoder_class = ExpireSpanDecoder
    option_rules: dict = {}  # the model's own options, checked after the shared ones: {option: (allowed, ok)}

    @classmethod
    def check_options(cls, cfg) -> None:
        """Stop with one line on an option value the model cannot be built or trained with."""
        check_model_options(cfg)
        check_option_rules(cfg, cls.option_rules)

    @classmethod
    def add_args(cls, parser):
        """fairseq's options from the config, and ``--no-X`` for every on/off option ``--X``, so that what a preset
        turns on can be turned off on the command line."""
        super().add_args(parser)
        for option in fields(getattr(cls, "__dataclass")):
            if option.type is bool:
                parser.add_argument(
                    _option("no_" + option.name),
                    dest=option.name,
                    action="store_false",
                    default=argparse.SUPPRESS,
                    help=f"turn {_option(option.name)} off (where a preset turns it on)",
                )

    @classmethod
    def build_model(cls, cfg, task):
        cls.check_options(cfg)
        return cls(cls.decoder_class(cfg, task.target_dictionary, learned_spans=cls.learned_spans))

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        self.decoder.check_weights(state_dict)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def reset_memory(self):
        self.decoder.reset_memory()

    def max_decoder_positions(self):
        """No limit on what is generated: the memory stays bounded (fairseq's generators need a number)."""
        return sys.maxsize

    @classmethod
    def from_pretrained(
        cls, model_name_or_path, checkpoint_file="checkpoint_best.pt", data_name_or_path=None, **kwargs
    ):
        """fairseq's hub interface (``.sample()``, ``.score()``, ``.generate()``) over a fairseq-train save
        directory. ``data_name_or_path``: the data directory (its dict.txt), absolute or relative to the save
        directory; by default the one the checkpoint was trained on (fairseq's default, the save directory
        itself, has no dict.txt)."""
        if data_name_or_path is None:
            path = os.path.join(model_name_or_path, checkpoint_file)
            data_name_or_path = os.path.abspath(
                torch.load(path, map_location="cpu", mmap=True, weights_only=False)["cfg"]["task"]["data"]
            )
        return super().from_pretrained(
            model_name_or_path, checkpoint_file=checkpoint_file, data_name_or_path=data_name_or_path, **kwargs
        )


@register_model("expire_span_lm", dataclass=ExpireSpanLMConfig)
class ExpireSpanLanguageModel(FixedSpanLanguageModel):
    """Expire-Span: every memory gets a learned span ``e = L * sigmoid(w . h + b)`` and is deleted after it."""

    learned_spans = True
    option_rules = (
        {  # a ramp of 0 gives NaN gradients, a negative one inverts the mask, p = 0 or 1 has no logit
            "expire_span_ramp": AT_LEAST_ONE,
            "expire_span_init_percentage": (
                "strictly between 0 and 1 (spans start at p * L)",
                lambda v: 0 < v < 1,
            ),
            "expire_span_pre_div": ("> 0", lambda v: v > 0),
        }
    )


# Named presets: each fills in what the command line left unset (the command itself is checked by
# fairseq_expire.usage before fairseq parses it).


def _set_defaults(args, **defaults):
    """Fill what the command line left unset: every value typed wins, 0 and ``--no-X`` included (the model's
    options are absent from the parsed command line unless typed)."""
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def transformer_xl(args, layers: int, width: int, ffn: int, heads: int, dropout: float) -> None:
    """The Transformer-XL under every memory scheme (paper 5.1), for what the command left unset; dropout also in
    the attention."""
    _set_defaults(
        args,
        decoder_layers=layers,
        decoder_embed_dim=width,
        decoder_ffn_embed_dim=ffn,
        decoder_attention_heads=heads,
        dropout=dropout,
        attention_dropout=dropout,
    )


def enwik8_layers(args, dropout: float = 0.3) -> None:
    """The paper's enwik8 model (Table 2): 12 layers, 512 wide, 8 heads; 38M parameters on bytes."""
    transformer_xl(args, 12, 512, 2048, 8, dropout)


def tiny_layers(args) -> None:
    """For tests and the demo corpus: 2 layers, 32 wide, 2 heads, no dropout."""
    transformer_xl(args, 2, 32, 64, 2, 0.0)


# Named presets: each fills in what the command line left unset (the command itself is checked by
# fairseq_expire.usage before fairseq parses it), then its layers.


@register_model_architecture("expire_span_lm", "expire_span_lm_enwik8")
def expire_span_lm_enwik8(args):
    """Paper Table 2: the enwik8 layers, L = 16K, R = 128, noisy spans."""
    _set_defaults(args, max_span=16384, expire_span_ramp=128, expire_span_noisy=True)
    enwik8_layers(args)


@register_model_architecture("expire_span_lm", "expire_span_lm_enwik8_small")
def expire_span_lm_enwik8_small(args):
    """Reference small enwik8 config: 8 layers, 256 wide, 4 heads, L = 4K, R = 64, pre_div 64, no dropout."""
    _set_defaults(args, max_span=4096, expire_span_ramp=64, expire_span_pre_div=64.0)
    transformer_xl(args, 8, 256, 1024, 4, dropout=0.0)


@register_model_architecture("expire_span_lm", "expire_span_lm_pg19")
def expire_span_lm_pg19(args):
    """Paper A.2.4 (PG-19, characters): the enwik8 layers with dropout 0.2, L = 16K (8K..32K), R = 128."""
    _set_defaults(args, max_span=16384, expire_span_ramp=128)
    enwik8_layers(args, dropout=0.2)


@register_model_architecture("expire_span_lm", "expire_span_lm_collision")
def expire_span_lm_collision(args):
    """Paper A.2.3 (colliding objects): 6 layers, 512 wide, 4 heads, pre-norm, p = 0.01, L = 16K, R = 128."""
    _set_defaults(
        args,
        decoder_normalize_before=True,
        max_span=16384,
        expire_span_ramp=128,
        expire_span_init_percentage=0.01,
    )
    transformer_xl(args, 6, 512, 1024, 4, dropout=0.1)


@register_model_architecture("expire_span_lm", "expire_span_lm_wt103")
def expire_span_lm_wt103(args):
    """Paper A.1.1 / A.2.4 (Wikitext-103, words): 8 layers, 1024 wide, L = 8K, adaptive input and softmax."""
    _set_defaults(
        args,
        embedding_dropout=0.2,
        max_span=8192,
        expire_span_ramp=128,
        adaptive_input=True,
        adaptive_input_cutoff="20000,60000",
        adaptive_softmax_cutoff="20000,60000",
        adaptive_softmax_dropout=0.2,
        tie_adaptive_weights=True,
    )
    transformer_xl(args, 8, 1024, 4096, 8, dropout=0.3)


@register_model_architecture("expire_span_lm", "expire_span_lm_tiny")
def expire_span_lm_tiny(args):
    """For tests and the demo: the tiny layers, L = 64, R = 8."""
    _set_defaults(args, max_span=64, expire_span_ramp=8)
    tiny_layers(args)


@register_model_architecture("fixed_span_lm", "fixed_span_lm_enwik8")
def fixed_span_lm_enwik8(args):
    """The paper's Transformer-XL 12L baseline (Table 2): the enwik8 layers with a fixed span of 512."""
    _set_defaults(args, max_span=512)
    enwik8_layers(args)


@register_model_architecture("fixed_span_lm", "fixed_span_lm_tiny")
def fixed_span_lm_tiny(args):
    """For tests: the tiny layers with a fixed span of 64."""
    _set_defaults(args, max_span=64)
    tiny_layers(args)
