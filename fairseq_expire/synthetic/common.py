"""What every synthetic task shares: its vocabulary, the generator interface, and writing a split as raw text plus
fairseq's binary format.

A task produces a split as a stream of :class:`Chunk` s, each holding whole units (episodes, time steps,
sentences) as symbol indices with one label per token. The label of a token is the ignore symbol ``_`` (not
scored) or the answer expected at that position. Splits are written in fairseq's mmap indexed format, next to a
label stream of the same shape (``{split}.labels.bin/.idx``) binarized with the same ``dict.txt``, so that
``--task language_modeling_with_memory`` trains on the tokens and scores the labels. The stream holds exactly
the task's tokens: no ``</s>`` is added (``fairseq-preprocess`` would add one per line of the raw text, which
would put tokens in the stream that are not part of the task).
"""

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Type

import numpy as np
import torch
from fairseq.data import Dictionary, indexed_dataset

logger = logging.getLogger(__name__)

IGNORE = "_"
SPLITS = ("train", "valid", "test")
# Largest binary item: the task reads whole items, so a few thousand tokens keep block reads cheap.
ITEM_TOKENS = 2048
# Units are generated in chunks of about this many tokens, which bounds memory on paper-sized splits.
CHUNK_TOKENS = 1 << 20


class SyntheticDataError(ValueError):
    """A request that cannot give a usable dataset (bad option, impossible size, existing output)."""


class Vocabulary:
    """The fixed, ordered symbols of a task; tokens and labels are indices into it."""

    def __init__(self, symbols: Sequence[str]):
        symbols = list(symbols)
        if IGNORE not in symbols:
            symbols.append(IGNORE)
        if len(set(symbols)) != len(symbols) or any(not s or any(c.isspace() for c in s) for s in symbols):
            raise ValueError(f"symbols must be distinct non-empty words: {symbols}")
        self.symbols = symbols
        self._index = {symbol: i for i, symbol in enumerate(symbols)}

    def __len__(self) -> int:
        return len(self.symbols)

    def __getitem__(self, symbol: str) -> int:
        return self._index[symbol]

    def indices(self, symbols: Sequence[str]) -> np.ndarray:
        return np.array([self._index[s] for s in symbols], dtype=np.int64)

    @property
    def ignore(self) -> int:
        return self._index[IGNORE]


@dataclass
class Chunk:
    """Consecutive whole units of a split: tokens and labels (vocabulary indices) and the length of each raw-text
    line (one line per unit or sentence, for people reading the text)."""

    tokens: np.ndarray
    labels: np.ndarray
    line_lengths: np.ndarray

    def __post_init__(self):
        assert self.tokens.shape == self.labels.shape and int(self.line_lengths.sum()) == len(self.tokens)


class SyntheticTask:
    """A generator: ``config`` is its dataclass of options (validated by :meth:`check`)."""

    name: str = ""
    config_class: Type = None

    def __init__(self, config):
        self.config = config
        self.check()
        self.vocab = Vocabulary(self.symbols())

    def check(self):
        """Raise :class:`SyntheticDataError` naming the option to fix when the options cannot work."""

    def symbols(self) -> List[str]:
        raise NotImplementedError

    def min_split_tokens(self) -> int:
        """The smallest split that is sure to hold one whole unit (episode or step)."""
        raise NotImplementedError

    def chunks(self, rng: np.random.Generator, num_tokens: int) -> Iterator[Chunk]:
        """Whole units, at most ``num_tokens`` tokens in all and as many as fit."""
        raise NotImplementedError


class EpisodicTask(SyntheticTask):
    """A task made of independent episodes, sampled in batches as arrays with one row per episode."""

    def mean_episode_tokens(self) -> float:
        raise NotImplementedError

    def sample_episodes(self, rng: np.random.Generator, count: int) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def episode_lengths(self, episodes: Dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def render(self, rng: np.random.Generator, episodes: Dict[str, np.ndarray]) -> Chunk:
        raise NotImplementedError

    def chunks(self, rng: np.random.Generator, num_tokens: int) -> Iterator[Chunk]:
        remaining = num_tokens
        per_chunk = max(1, int(CHUNK_TOKENS / self.mean_episode_tokens()))
        while True:
            count = int(min(per_chunk, remaining / self.mean_episode_tokens() + 1))
            episodes = self.sample_episodes(rng, count)
            lengths = self.episode_lengths(episodes)
            fit = int(np.searchsorted(np.cumsum(lengths), remaining, side="right"))
            if fit == 0:
                return
            yield self.render(rng, {key: value[:fit] for key, value in episodes.items()})
            remaining -= int(lengths[:fit].sum())


GENERATORS: Dict[str, Type[SyntheticTask]] = {}


def register_generator(name: str, config_class: Type) -> Callable:
    def register(cls):
        if name in GENERATORS:
            raise ValueError(f"synthetic task {name} is registered twice")
        cls.name, cls.config_class = name, config_class
        GENERATORS[name] = cls
        return cls

    return register


def segments(symbols: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Rows of runs ``symbols[e, s]`` repeated ``lengths[e, s]`` times, concatenated row by row."""
    return np.repeat(symbols.ravel(), lengths.ravel())


class TextRenderer:
    """Vocabulary indices to whitespace-separated text, one line per unit, without a Python loop per token."""

    def __init__(self, vocab: Vocabulary):
        encoded = [symbol.encode("utf-8") + b" " for symbol in vocab.symbols]
        self.widths = np.array([len(e) for e in encoded], dtype=np.int64)
        self.table = np.zeros((len(encoded), int(self.widths.max())), dtype=np.uint8)
        for i, e in enumerate(encoded):
            self.table[i, : len(e)] = np.frombuffer(e, dtype=np.uint8)

    def render(self, symbols: np.ndarray, line_lengths: np.ndarray) -> bytes:
        widths = self.widths[symbols]
        text = self.table[symbols][np.arange(self.table.shape[1]) < widths[:, None]]
        text[np.cumsum(widths)[np.cumsum(line_lengths) - 1] - 1] = ord("\n")
        return text.tobytes()


class SplitWriter:
    """Writes one split as it is generated: binary tokens and labels, and optionally their raw text."""

    def __init__(
        self,
        directory: Path,
        split: str,
        dictionary: Dictionary,
        vocab: Vocabulary,
        text: Optional[TextRenderer],
    ):
        self.ids = vocab_ids(dictionary, vocab)
        self.text = text
        self.builders = {}
        self.text_files = {}
        self.paths = {}
        for stream in ("tokens", "labels"):
            prefix = directory / (split if stream == "tokens" else f"{split}.labels")
            self.paths[stream] = prefix
            self.builders[stream] = indexed_dataset.make_builder(
                str(prefix) + ".bin", impl="mmap", vocab_size=len(dictionary)
            )
            if text is not None:
                raw = directory / "raw" / (f"{split}.txt" if stream == "tokens" else f"{split}.labels.txt")
                self.text_files[stream] = open(raw, "wb")
        self.counts = np.zeros(len(vocab), dtype=np.int64)
        self.num_tokens = 0
        self.num_lines = 0
        self.scored = 0
        self.ignore = vocab.ignore

    def write(self, chunk: Chunk):
        for stream, symbols in (("tokens", chunk.tokens), ("labels", chunk.labels)):
            ids = torch.from_numpy(self.ids[symbols])
            for start in range(0, len(ids), ITEM_TOKENS):
                self.builders[stream].add_item(ids[start : start + ITEM_TOKENS])
            if stream in self.text_files:
                self.text_files[stream].write(self.text.render(symbols, chunk.line_lengths))
        self.counts += np.bincount(chunk.tokens, minlength=len(self.counts))
        self.num_tokens += len(chunk.tokens)
        self.num_lines += len(chunk.line_lengths)
        self.scored += int((chunk.labels != self.ignore).sum())

    def close(self):
        for stream, builder in self.builders.items():
            builder.finalize(str(self.paths[stream]) + ".idx")
        for handle in self.text_files.values():
            handle.close()


def task_dictionary(vocab: Vocabulary) -> Dictionary:
    """fairseq's Dictionary with the task's symbols in their fixed order, after fairseq's special symbols; the
    counts written to dict.txt are those of the train split (for information only)."""
    dictionary = Dictionary()
    for symbol in vocab.symbols:
        dictionary.add_symbol(symbol, n=0)
    return dictionary


def vocab_ids(dictionary: Dictionary, vocab: Vocabulary) -> np.ndarray:
    """Dictionary id of each vocabulary index."""
    return np.array([dictionary.index(symbol) for symbol in vocab.symbols], dtype=np.int64)


def split_seed(seed: int, split: str) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, SPLITS.index(split)])


def check_sizes(task: SyntheticTask, sizes: Dict[str, int]):
    smallest = task.min_split_tokens()
    for split, size in sizes.items():
        if size < smallest:
            raise SyntheticDataError(
                f"--{split}-tokens {size} cannot hold one whole {task.name} unit, which can take {smallest} tokens "
                f"with these options: ask for at least {smallest} tokens (or shorten the {task.name} units)"
            )


def check_new_output(out: Path):
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SyntheticDataError(
            f"{out} already exists: remove it or choose another --out (nothing was written)"
        )


def generate_dataset(
    task: SyntheticTask, out: Path, sizes: Dict[str, int], seed: int, raw_text: bool = True
) -> Dict[str, dict]:
    """Generate every split of ``task`` into the new directory ``out`` (a fairseq data-bin directory).

    The splits are written to a temporary sibling directory that is renamed to ``out`` at the end, so a failed
    or interrupted run leaves nothing that looks like a dataset. Returns the statistics of each split.
    """
    out = Path(out)
    check_new_output(out)
    check_sizes(task, sizes)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp makes it private; the dataset should not be
    try:
        if raw_text:
            (work / "raw").mkdir()
        stats = {}
        dictionary = task_dictionary(task.vocab)
        text = TextRenderer(task.vocab) if raw_text else None
        for split, size in sizes.items():
            started = time.perf_counter()
            writer = SplitWriter(work, split, dictionary, task.vocab, text)
            rng = np.random.default_rng(split_seed(seed, split))
            for chunk in task.chunks(rng, size):
                writer.write(chunk)
            writer.close()
            if writer.scored == 0:
                raise SyntheticDataError(
                    f"the {split} split of {task.name} ({writer.num_tokens} tokens) has no scored answer: "
                    f"make it larger (--{split}-tokens) so that accuracy can be measured"
                )
            if split == "train":
                for symbol, count in zip(task.vocab.symbols, writer.counts):
                    dictionary.count[dictionary.index(symbol)] = int(count)
            stats[split] = {"tokens": writer.num_tokens, "lines": writer.num_lines, "scored": writer.scored}
            logger.info(
                f"{task.name} {split}: {writer.num_tokens:,} tokens, {writer.scored:,} scored answers "
                f"({time.perf_counter() - started:.1f} s)"
            )
        dictionary.save(str(work / "dict.txt"))
        metadata = {
            "task": task.name,
            "options": dataclasses.asdict(task.config),
            "seed": seed,
            "ignore_label": IGNORE,
            "splits": stats,
        }
        (work / "generation.json").write_text(json.dumps(metadata, indent=2) + "\n")
        check_new_output(out)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return stats
