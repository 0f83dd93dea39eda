"""Any text files as a fairseq data directory: tokens are bytes, characters, or sentencepiece pieces.

Splits, either by files (``--train A --valid B --test C``, each the concatenation of its files) or by fraction of
one corpus of N bytes (``--input FILES``, concatenated): train is the text before the first line that starts at
or after byte ``round((1 - valid_fraction - test_fraction) * N)``, valid runs up to the first line starting at or
after ``round((1 - test_fraction) * N)``, test is the rest. Splits are cut between lines, never inside one.

Tokenizations (``--tokenizer``):

- ``bytes``: one token per byte, every byte value in the vocabulary (no ``<unk>``), as for enwik8;
- ``chars``: one token per UTF-8 character, the vocabulary being the characters of train (others are ``<unk>``);
- ``spm``: a sentencepiece model with ``--spm-vocab-size`` pieces trained on the train split only, saved as
  ``spm.model`` next to the data; every line is encoded on its own.

Newlines: ``--newlines eos`` makes each one the token ``</s>`` (bytes and chars: the round trip back to the text
is exact; spm normalizes spaces), ``--newlines drop`` removes them.
"""

import codecs
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
from fairseq.data import Dictionary

from fairseq_expire.cli import list_option, option

from .output import SPLITS, DataDirectory, PrepareError, SplitWriter, force_option
from .vocab import (
    CODE_POINTS,
    ENCODING_ERRORS,
    NEWLINE_MODES,
    PADDING_FACTOR,
    ByteVocabulary,
    CharVocabulary,
    char_symbol,
    count_characters,
    newline_description,
    unknown_report,
)

logger = logging.getLogger(__name__)

TOKENIZERS = ("bytes", "chars", "spm")
CHUNK_BYTES = 1 << 22
SPM_LINES_PER_BATCH = 10000

# A split is a list of (file, first byte, end byte) pieces read one after the other.
Segment = Tuple[Path, int, int]


@dataclass
class TextConfig:
    out: Path = option(None, "the data directory to write", required=True)
    input: List[Path] = list_option(
        list, "text files, concatenated and split by --valid-fraction and --test-fraction", metavar="FILE"
    )
    train: List[Path] = list_option(list, "the train split's files (instead of --input)", metavar="FILE")
    valid: List[Path] = list_option(list, "the valid split's files (with --train)", metavar="FILE")
    test: List[Path] = list_option(list, "the test split's files (with --train)", metavar="FILE")
    valid_fraction: float = option(0.05, "share of --input for valid")
    test_fraction: float = option(0.05, "share of --input for test (its end)")
    tokenizer: str = option(
        "chars", "tokens are bytes, characters or sentencepiece pieces", choices=TOKENIZERS
    )
    spm_vocab_size: int = option(8000, "pieces of the sentencepiece model (spm)")
    spm_model_type: str = option("unigram", "sentencepiece model type (spm)", choices=("unigram", "bpe"))
    newlines: str = option(
        "eos", "eos: each newline is the token </s>; drop: remove newlines", choices=NEWLINE_MODES
    )
    encoding_errors: str = option(
        "strict",
        "text that is not UTF-8 (chars, spm): strict stops with an error naming the file, replace reads bad "
        "bytes as U+FFFD",
        choices=ENCODING_ERRORS,
    )
    force: bool = force_option()


def _file_sizes(paths: List[Path]) -> List[int]:
    sizes = []
    for path in paths:
        if not path.is_file():
            raise PrepareError(f"{path}: no such file")
        sizes.append(path.stat().st_size)
    return sizes


def _segments(paths: List[Path], sizes: List[int], begin: int, end: int) -> List[Segment]:
    """The pieces of files that hold bytes ``[begin, end)`` of their concatenation."""
    pieces, offset = [], 0
    for path, size in zip(paths, sizes):
        first, last = max(begin - offset, 0), min(end - offset, size)
        if first < last:
            pieces.append((path, first, last))
        offset += size
    return pieces


def read_segments(segments: List[Segment]) -> Iterator[Tuple[bytes, Path, int]]:
    """The bytes of ``segments`` in chunks, each with its file and offset there."""
    for path, begin, end in segments:
        with open(path, "rb") as handle:
            handle.seek(begin)
            offset = begin
            while offset < end:
                chunk = handle.read(min(CHUNK_BYTES, end - offset))
                if not chunk:
                    raise PrepareError(f"{path} shrank while being read")
                yield chunk, path, offset
                offset += len(chunk)


def _line_start(paths: List[Path], sizes: List[int], position: int) -> int:
    """The first line start at or after byte ``position`` of the concatenation (its length if none)."""
    total = sum(sizes)
    if position <= 0:
        return 0
    offset = position - 1  # a line starts at `position` when the byte before it is a newline
    for chunk, _, _ in read_segments(_segments(paths, sizes, offset, total)):
        found = chunk.find(b"\n")
        if found >= 0:
            return offset + found + 1
        offset += len(chunk)
    return total


def plan_splits(config: TextConfig) -> Dict[str, List[Segment]]:
    """The file pieces of each split (see the module doc for the rule)."""
    by_files = any((config.train, config.valid, config.test))
    if by_files == bool(config.input):
        raise PrepareError(
            "give either --input FILES (split by fraction) or --train, --valid and --test FILES"
        )
    if by_files:
        missing = [f"--{split}" for split in SPLITS if not getattr(config, split)]
        if missing:
            raise PrepareError(f"splitting by files needs {' and '.join(missing)} too")
        plan = {}
        for split in SPLITS:
            paths = list(getattr(config, split))
            plan[split] = [(path, 0, size) for path, size in zip(paths, _file_sizes(paths))]
        return plan
    valid, test = config.valid_fraction, config.test_fraction
    if not (0 < valid and 0 < test and valid + test < 1):
        raise PrepareError(
            f"--valid-fraction {valid} and --test-fraction {test}: each must be above 0 and together below 1"
        )
    paths = list(config.input)
    sizes = _file_sizes(paths)
    total = sum(sizes)
    cuts = [
        0,
        *(_line_start(paths, sizes, round(f * total)) for f in (1 - valid - test, 1 - test)),
        total,
    ]
    return {split: _segments(paths, sizes, cuts[i], cuts[i + 1]) for i, split in enumerate(SPLITS)}


def _check_not_empty(plan: Dict[str, List[Segment]], config: TextConfig):
    for split, segments in plan.items():
        if sum(end - begin for _, begin, end in segments) > 0:
            continue
        if not config.input:
            raise PrepareError(f"the {split} files ({', '.join(map(str, getattr(config, split)))}) are empty")
        raise PrepareError(
            f"the {split} split of {', '.join(map(str, config.input))} is empty: the text is empty or has too few "
            "lines to cut at --valid-fraction and --test-fraction; give more text, other fractions, or "
            "--train/--valid/--test files"
        )


def read_text(segments: List[Segment], errors: str) -> Iterator[str]:
    """The UTF-8 text of ``segments`` in chunks; a decoding error names the file and the byte."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    for chunk, path, offset in read_segments(segments):
        pending = len(decoder.getstate()[0])
        try:
            yield decoder.decode(chunk)
        except UnicodeDecodeError as error:
            raise PrepareError(
                f"{path} is not UTF-8 (near byte {offset - pending + error.start:,}: {error.reason}): fix the "
                "file, use --tokenizer bytes, or pass --encoding-errors replace to read bad bytes as U+FFFD"
            ) from None
    try:
        yield decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise PrepareError(
            f"{segments[-1][0]} ends inside a UTF-8 character: fix the file, use --tokenizer bytes, or pass "
            "--encoding-errors replace"
        ) from None


def read_lines(segments: List[Segment], errors: str) -> Iterator[Tuple[str, bool]]:
    """The lines of ``segments`` without their newline, each with whether it had one."""
    rest = ""
    for text in read_text(segments, errors):
        lines = (rest + text).split("\n")
        rest = lines.pop()
        for line in lines:
            yield line, True
    if rest:
        yield rest, False


class SentencePieceVocabulary:
    """A sentencepiece model trained on the train split; its pieces in model order make the dictionary."""

    unit = "sentencepiece"

    def __init__(self, model: bytes, newlines: str):
        import sentencepiece

        self.model = model
        self.newlines = newlines
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model)
        self.dictionary = Dictionary()
        self.ids = np.zeros(self.processor.get_piece_size(), dtype=np.int32)
        for piece_id in range(self.processor.get_piece_size()):
            if self.processor.is_unknown(piece_id) or self.processor.is_control(piece_id):
                self.ids[piece_id] = self.dictionary.unk()
                continue
            piece = self.processor.id_to_piece(piece_id)
            symbol = "".join(map(char_symbol, piece))
            if symbol in self.dictionary.indices:  # a piece that reads like fairseq's <s>, </s>, <pad>...
                symbol = "".join(f"<U+{ord(c):04X}>" for c in piece)
            self.ids[piece_id] = self.dictionary.add_symbol(symbol, n=0)
        self.dictionary.pad_to_multiple_(PADDING_FACTOR)

    @classmethod
    def train(cls, lines: Iterator[str], config: TextConfig) -> "SentencePieceVocabulary":
        import sentencepiece

        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=lines,
                model_writer=model,
                vocab_size=config.spm_vocab_size,
                model_type=config.spm_model_type,
                unk_id=0,
                bos_id=-1,
                eos_id=-1,
                pad_id=-1,
                input_sentence_size=10_000_000,
                shuffle_input_sentence=True,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as error:
            raise PrepareError(
                f"sentencepiece could not train on the train split ({error}): lower --spm-vocab-size or give more "
                "text"
            ) from None
        return cls(model.getvalue(), config.newlines)

    def encode_lines(self, lines: List[Tuple[str, bool]]) -> np.ndarray:
        eos = self.dictionary.eos()
        pieces = self.processor.encode([line for line, _ in lines])
        ids = []
        for line_pieces, (_, ended) in zip(pieces, lines):
            ids.extend(self.ids[line_pieces].tolist())
            if ended and self.newlines == "eos":
                ids.append(eos)
        return np.array(ids, dtype=np.int32)

    def decode(self, ids: np.ndarray) -> str:
        """Token ids back to text (as sentencepiece normalized it): lines split at ``</s>``."""
        piece_of = {int(fairseq_id): piece_id for piece_id, fairseq_id in enumerate(self.ids)}
        lines = [[]]
        for token in np.asarray(ids).tolist():
            if token == self.dictionary.eos():
                lines.append([])
            else:
                lines[-1].append(piece_of[token])
        return "\n".join(self.processor.decode(line) for line in lines)

    def describe(self) -> dict:
        return {
            "unit": self.unit,
            "symbols": "the pieces of spm.model in its order (id i of the model is symbol i of its pieces, "
            "whitespace and unprintable characters as <U+XXXX>)",
            "model": "spm.model",
            "pieces": self.processor.get_piece_size(),
            "newlines": self.newlines,
            "newline_handling": newline_description(self.newlines),
        }


def _write_bytes(plan, writers: Dict[str, SplitWriter], vocab: ByteVocabulary) -> Dict[str, dict]:
    stats = {}
    for split, segments in plan.items():
        for chunk, _, _ in read_segments(segments):
            writers[split].write(vocab.encode(chunk))
        stats[split] = {"unknown": 0}
    return stats


def _char_vocabulary(plan, config: TextConfig) -> CharVocabulary:
    counts = np.zeros(CODE_POINTS, dtype=np.int64)
    for text in read_text(plan["train"], config.encoding_errors):
        codes, text_counts = count_characters(text, config.newlines)
        counts[codes] += text_counts
    return CharVocabulary(counts, config.newlines)


def _write_chars(plan, writers, vocab: CharVocabulary, errors: str) -> Dict[str, dict]:
    stats = {}
    for split, segments in plan.items():
        unknown: Dict[int, int] = {}
        for text in read_text(segments, errors):
            ids, chunk_unknown = vocab.encode(text)
            writers[split].write(ids)
            for code, count in chunk_unknown.items():
                unknown[code] = unknown.get(code, 0) + count
        stats[split] = {"unknown": sum(unknown.values()), "unknown_characters": unknown_report(unknown)}
    return stats


def _batches(lines: Iterator[Tuple[str, bool]], size: int) -> Iterator[List[Tuple[str, bool]]]:
    batch = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_pieces(plan, writers, vocab: SentencePieceVocabulary, errors: str) -> Dict[str, dict]:
    stats = {}
    for split, segments in plan.items():
        unknown = 0
        for batch in _batches(read_lines(segments, errors), SPM_LINES_PER_BATCH):
            ids = vocab.encode_lines(batch)
            unknown += int((ids == vocab.dictionary.unk()).sum())
            writers[split].write(ids)
        stats[split] = {"unknown": unknown}
    return stats


def prepare_text(config: TextConfig) -> dict:
    plan = plan_splits(config)
    _check_not_empty(plan, config)
    if config.input:
        split_rule = {
            "input": [str(p) for p in config.input],
            "valid_fraction": config.valid_fraction,
            "test_fraction": config.test_fraction,
        }
    else:
        split_rule = {split: [str(p) for p in getattr(config, split)] for split in SPLITS}
    recipe = {
        "splits": split_rule,
        "tokenizer": config.tokenizer,
        "newlines": config.newlines,
        "encoding_errors": config.encoding_errors,
        **(
            {"spm_vocab_size": config.spm_vocab_size, "spm_model_type": config.spm_model_type}
            if config.tokenizer == "spm"
            else {}
        ),
    }
    files = {path for segments in plan.values() for path, _, _ in segments}
    inputs = {str(p): {"bytes": p.stat().st_size, "modified_ns": p.stat().st_mtime_ns} for p in sorted(files)}
    target = DataDirectory(config.out, "text", recipe, config.force, inputs)
    record = target.finished()
    if record is not None:
        logger.info(f"{config.out} is already prepared (delete it or pass --force to prepare it again)")
        return record
    if config.tokenizer == "bytes":
        vocab = ByteVocabulary(config.newlines)
    elif config.tokenizer == "chars":
        vocab = _char_vocabulary(plan, config)
    else:
        logger.info(f"training a {config.spm_vocab_size}-piece sentencepiece model on the train split")
        lines = (line for line, _ in read_lines(plan["train"], config.encoding_errors))
        vocab = SentencePieceVocabulary.train(lines, config)
    with target:
        writers = target.writers(vocab.dictionary)
        if config.tokenizer == "bytes":
            stats = _write_bytes(plan, writers, vocab)
        elif config.tokenizer == "chars":
            stats = _write_chars(plan, writers, vocab, config.encoding_errors)
        else:
            (target.work / "spm.model").write_bytes(vocab.model)
            stats = _write_pieces(plan, writers, vocab, config.encoding_errors)
        for writer in writers.values():
            writer.close()
        vocab.dictionary.count = writers["train"].counts.tolist()
        splits = {
            split: {
                "bytes": sum(end - begin for _, begin, end in plan[split]),
                "pieces": [[str(path), begin, end] for path, begin, end in plan[split]],
                "tokens": writers[split].tokens,
                **stats[split],
            }
            for split in SPLITS
        }
        readable = {
            split: ", ".join(f"{path} bytes [{begin:,}, {end:,})" for path, begin, end in plan[split])
            for split in SPLITS
        }
        return target.finish(
            vocab.dictionary,
            splits,
            {"tokenization": vocab.describe()},
            [
                "Text: " + "; ".join(f"{split} = {pieces}" for split, pieces in readable.items()) + ".",
                f"Tokens: {vocab.unit} (--tokenizer {config.tokenizer}); dict.txt symbols: "
                f"{vocab.describe()['symbols']}.",
                f"Newlines (--newlines {config.newlines}): {vocab.describe()['newline_handling']}.",
            ],
        )
