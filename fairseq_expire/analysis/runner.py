"""A checkpoint with its dictionary, text to tokens and back, and a block-by-block run that records each token.

The run cuts a token sequence into contiguous streams and blocks with the task's own batches
(:class:`~fairseq_expire.data.streams.StreamBatches`, memory carried from a cold start), as ``fairseq-eval-lm``
does with the ``language_modeling_with_memory`` task, so its losses are the ones ``fairseq-eval-lm`` averages, now
per token, next to the spans.
"""

import codecs
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
from fairseq import checkpoint_utils, utils
from fairseq.data import Dictionary
from torch import Tensor

from fairseq_expire.data.streams import StreamBatches, StreamSplit, TokenSequence
from fairseq_expire.errors import UsageError
from fairseq_expire.prepare.output import RECORD
from fairseq_expire.prepare.text import SentencePieceVocabulary
from fairseq_expire.prepare.vocab import symbol_bytes, symbol_char, unknown_report

logger = logging.getLogger(__name__)

TEXT_UNITS = ("bytes", "characters")


class AnalysisError(UsageError):
    """A problem the user can fix; the message names it and the fix."""


@dataclass
class Vocabulary:
    """What the model's token ids stand for: ``unit`` is "bytes", "characters", "sentencepiece" (then ``pieces``
    is the data's spm.model), or None (words)."""

    dictionary: Dictionary
    unit: Optional[str]
    newlines: str  # "eos": a newline is </s>; "drop": the data has none
    pieces: Optional[SentencePieceVocabulary] = None

    def encode(self, text: str) -> Tensor:
        """Token ids of ``text`` (N), as the data preparation made them from the same text."""
        if self.pieces is not None:
            lines = text.split("\n")
            ended = [(line, True) for line in lines[:-1]] + ([(lines[-1], False)] if lines[-1] else [])
            return torch.tensor(self.pieces.encode_lines(ended), dtype=torch.long)
        if self.unit not in TEXT_UNITS:
            raise AnalysisError(
                "text can be encoded only for byte-, character- or sentencepiece-level models; this "
                "dictionary has other symbols (words): use --split with --offset/--length instead of --text"
            )
        if self.newlines == "drop":
            text = text.replace("\n", "")
        ids_of = {
            piece: index for index, piece in enumerate(symbol_bytes(self.dictionary, self.unit)) if piece
        }
        if self.unit == "bytes":  # every byte value has a symbol (the newline: </s>)
            return torch.tensor([ids_of[bytes([value])] for value in text.encode("utf-8")], dtype=torch.long)
        missing = Counter(ord(char) for char in text if char.encode("utf-8") not in ids_of)
        if missing:
            listed = ", ".join(
                f"{name}: {count}" for name, count in unknown_report(missing, limit=10).items()
            )
            raise AnalysisError(
                f"{sum(missing.values())} characters of the text are not in the model's dictionary "
                f"({listed}): the model never saw them in training. Remove or replace them in the text."
            )
        return torch.tensor([ids_of[char.encode("utf-8")] for char in text], dtype=torch.long)

    def text_decoder(self) -> Callable[[int], str]:
        """A function from each next token id to the text it adds, for text shown as it is made: the bytes of a
        multi-byte character show it at its last byte ("" before), a sentencepiece piece its text with its
        space, a word its symbol and a space."""
        eos = self.dictionary.eos()
        if self.pieces is not None:
            piece_of = {int(fairseq_id): piece_id for piece_id, fairseq_id in enumerate(self.pieces.ids)}
            processor = self.pieces.processor
            line_start = [True]  # sentencepiece marks the start of every line with a space, decoding drops it

            def piece_text(i: int) -> str:
                if i == eos:
                    line_start[0] = True
                    return "\n"
                if i not in piece_of:  # fairseq's specials and padding symbols
                    return self.dictionary[i]
                text = processor.id_to_piece(piece_of[i]).replace("\N{LOWER ONE EIGHTH BLOCK}", " ")
                if line_start[0] and text:
                    text, line_start[0] = text[1:] if text[0] == " " else text, False
                return text

            return piece_text
        if self.unit not in TEXT_UNITS:  # words: their symbols, space-separated
            return lambda i: "\n" if i == eos else self.dictionary[i] + " "
        table = symbol_bytes(self.dictionary, self.unit)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: utf8.decode(table[i] if table[i] is not None else self.dictionary[i].encode())

    def token_strings(self, ids) -> List[str]:
        """One display string per token (see :meth:`text_decoder`)."""
        decode = self.text_decoder()
        return [decode(i) for i in torch.as_tensor(ids).tolist()]

    def text(self, ids) -> str:
        return "".join(self.token_strings(ids))


def vocabulary_of(data_dir: Path, dictionary: Dictionary) -> Vocabulary:
    """The unit and newline handling recorded by the data preparation, or guessed from the symbols."""
    record = Path(data_dir) / RECORD
    if record.is_file():
        tokenization = json.loads(record.read_text(encoding="utf-8")).get("tokenization", {})
        unit, newlines = tokenization.get("unit"), tokenization.get("newlines", "eos")
        if unit == "sentencepiece":
            model = Path(data_dir) / tokenization.get("model", "spm.model")
            return Vocabulary(
                dictionary, unit, newlines, SentencePieceVocabulary(model.read_bytes(), newlines)
            )
        return Vocabulary(dictionary, unit if unit in TEXT_UNITS else None, newlines)
    symbols = [
        symbol
        for index, symbol in enumerate(dictionary.symbols)
        if index >= dictionary.nspecial and not symbol.startswith("madeupword")
    ]
    if len(symbols) >= 255 and all(symbol.isdigit() and int(symbol) < 256 for symbol in symbols):
        unit = "bytes"
    elif all(symbol_char(symbol) is not None for symbol in symbols):
        unit = "characters"
    else:
        unit = None
    logger.info(f"{data_dir} has no {RECORD}: tokens taken to be {unit or 'words or pieces'}")
    return Vocabulary(dictionary, unit, "eos")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    task: object  # LanguageModelingWithMemoryTask
    vocabulary: Vocabulary
    checkpoint: Path
    data_dir: Path

    @property
    def block_size(self) -> int:
        return self.model.decoder.block_size

    @property
    def max_span(self) -> int:
        return self.model.decoder.rule.max_span

    @property
    def learned_spans(self) -> bool:
        return self.model.decoder.rule.learned

    @property
    def num_layers(self) -> int:
        return len(self.model.decoder.layers)

    def cap_spans(self, cap: Optional[int]) -> None:
        """Evaluate with every span capped at ``cap`` steps (the option inference_max_span; None: no cap)."""
        if cap is not None and cap < 1:
            raise AnalysisError(f"span cap {cap}: must be at least 1 step (leave it out: no cap)")
        if cap is not None and not self.model.decoder.accepts_inference_max_span:
            raise AnalysisError(
                f"{self.checkpoint} holds a {type(self.model).__name__}, which has no span to cap: its memory is "
                "set by --mem-size, --cmem-size and --compression-rate. Evaluate it without caps (--caps none)"
            )
        self.model.decoder.inference_max_span = cap

    def split_tokens(self, split: str, offset: int = 0, length: Optional[int] = None) -> Tensor:
        """Tokens ``[offset, offset + length)`` of a binarized split of the data directory (N)."""
        try:
            self.task.load_dataset(split)
        except FileNotFoundError as error:
            raise AnalysisError(f"{error}") from error
        tokens = self.task.dataset(split).tokens
        end = len(tokens) if length is None else min(offset + length, len(tokens))
        if not 0 <= offset < len(tokens):
            raise AnalysisError(
                f"--offset {offset} is outside split '{split}' ({len(tokens)} tokens): use 0 <= offset < "
                f"{len(tokens)}"
            )
        return tokens.read(offset, end)


def load_model(
    checkpoint, data: Optional[Path] = None, inference_max_span: Optional[int] = None, cpu: bool = False
) -> LoadedModel:
    """The model of ``checkpoint`` in evaluation mode, spans capped at ``inference_max_span`` (None: uncapped).

    ``data``: the data directory whose ``dict.txt`` the model was trained with (default: the one recorded in the
    checkpoint). On the GPU when there is one, unless ``cpu``.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise AnalysisError(
            f"checkpoint {checkpoint} not found: pass the .pt file fairseq-train wrote (its --save-dir, "
            "e.g. checkpoints/checkpoint_best.pt); `python scripts/demo.py` trains a small one"
        )
    overrides = {}
    if data is not None:
        if not (Path(data) / "dict.txt").is_file():
            raise AnalysisError(
                f"{data}/dict.txt not found: --data must be the data directory the model was trained on"
            )
        overrides["data"] = str(data)
    try:
        models, _, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(checkpoint)], arg_overrides=overrides
        )
    except FileNotFoundError as error:  # the data directory recorded in the checkpoint has moved
        raise AnalysisError(
            f"{error}. Pass --data DIR, the data directory the model was trained on"
        ) from error
    model = models[0]
    if not callable(getattr(model, "reset_memory", None)):
        raise AnalysisError(
            f"{checkpoint} holds a {type(model).__name__}, not a model with a memory: analyse an "
            "expire_span_lm, fixed_span_lm, adaptive_span_lm or compressive_lm checkpoint"
        )
    if torch.cuda.is_available() and not cpu:
        model.cuda()
    model.eval()
    data_dir = Path(utils.split_paths(task.cfg.data)[0])
    logger.info(
        f"loaded {checkpoint}: {len(model.decoder.layers)} layers, L = {model.decoder.rule.max_span}, "
        f"M = {model.decoder.block_size}, inference cap {inference_max_span}"
    )
    loaded = LoadedModel(model, task, vocabulary_of(data_dir, task.dictionary), checkpoint, data_dir)
    loaded.cap_spans(inference_max_span)
    return loaded


@dataclass
class BlockRun:
    """What the model did with each of the N tokens of a sequence."""

    tokens: Tensor  # N
    spans: Tensor  # layers x N   expire-span e of each token's memory (fixed-span models: L)
    nll: Tensor  # N   nats for predicting the token from those before it; NaN at a stream's first token
    mem_per_layer: (
        Tensor  # layers   entries kept after a block, mean over blocks and streams, weighted by targets
    )
    attn_mem_avg: float = (
        math.nan
    )  # keys attended per query (paper's |C_t|), mean over layers and blocks, likewise

    @property
    def scored(self) -> Tensor:  # N, True where the token was predicted
        return ~self.nll.isnan()

    def bits_per_token(self) -> float:
        """Mean loss over the predicted tokens in bits: what ``fairseq-eval-lm`` reports as "Loss (base 2)"."""
        return float(self.nll[self.scored].mean()) / math.log(2)


def run_blocks(loaded: LoadedModel, tokens: Tensor, streams: int = 1) -> BlockRun:
    """Feed ``tokens`` (N) block by block, memory carried, as ``fairseq-eval-lm --batch-size streams`` does.

    The sequence is cut into ``streams`` contiguous streams run side by side (more is faster; each stream starts
    from an empty memory, and its first token is not predicted).
    """
    model, M = loaded.model, loaded.block_size
    pad = loaded.vocabulary.dictionary.pad()
    N = len(tokens)
    if N < 2 * streams:
        raise AnalysisError(
            f"{N} tokens cannot be cut into {streams} streams of at least two tokens: give a longer text "
            "or fewer --streams"
        )
    batches = StreamBatches(StreamSplit("text", TokenSequence.in_memory(tokens), pad), streams, 1, 0, M)
    device = next(model.parameters()).device
    spans = torch.full((loaded.num_layers, N), math.nan)
    nll = torch.full((N,), math.nan)
    kept_sum, attended_sum, targets_seen = torch.zeros(loaded.num_layers), 0.0, 0
    with torch.no_grad():
        for k in range(len(batches)):
            batch = batches[k]  # the task's batch k: block k of every stream
            source, target = batch["net_input"]["src_tokens"], batch["target"]
            pieces = [batches.layout.block(stream, k) for stream in batches.streams]
            output = model(source.to(device), reset_memory=batch["net_input"]["reset_memory"])
            log_probs = model.get_normalized_probs(
                output, log_probs=True, sample={"target": target.to(device)}
            )
            token_nll = (
                -log_probs.gather(-1, target.to(device).unsqueeze(-1)).squeeze(-1).float().cpu()
            )  # B x M
            block_spans = output[1]["spans"].float().cpu()  # layers x B x M
            for row, (first, last) in enumerate(pieces):
                inputs = min(last, first + M) - first
                spans[:, first : first + inputs] = block_spans[:, row, :inputs]
                nll[first + 1 : last] = token_nll[row, : last - first - 1]
            block_targets = int(target.ne(pad).sum())
            kept_sum += output[1]["mem_per_layer"].float().cpu() * block_targets
            attended_sum += float(output[1]["attn_mem_avg"]) * block_targets
            targets_seen += block_targets
    return BlockRun(tokens, spans, nll, kept_sum / max(targets_seen, 1), attended_sum / max(targets_seen, 1))
