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
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Type

import numpy as np
from fairseq.data import Dictionary

from fairseq_expire.errors import UsageError
from fairseq_expire.prepare.output import SPLITS, DataDirectory, SplitWriter

logger = logging.getLogger(__name__)

IGNORE = "_"
# Units are generated in chunks of about this many tokens, which bounds memory on paper-sized splits.
CHUNK_TOKENS = 1 << 20


class SyntheticDataError(UsageError):
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

    def check_range(self, low: str, high: str):
        """Refuse a range of options ``low``..``high`` (lengths, gaps) that is empty or starts below 1."""
        a, b = getattr(self.config, low), getattr(self.config, high)
        if not 1 <= a <= b:
            options = [f"--{name.replace('_', '-')}" for name in (low, high)]
            raise SyntheticDataError(f"need 1 <= {options[0]} <= {options[1]}, got {a} and {b}")

    def recipe(self) -> dict:
        """The options that decide the data, as recorded in ``prepare.json`` (an existing directory made with
        other ones needs ``--force``)."""
        return dataclasses.asdict(self.config)

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


class LabelledSplitWriter:
    """One split as it is generated: the tokens and the labels (two binary streams) and optionally their raw text."""

    def __init__(
        self,
        directory: Path,
        split: str,
        dictionary: Dictionary,
        vocab: Vocabulary,
        text: Optional[TextRenderer],
    ):
        self.ids = vocab_ids(dictionary, vocab)
        self.streams = {
            "tokens": SplitWriter(directory / split, dictionary),
            "labels": SplitWriter(directory / f"{split}.labels", dictionary),
        }
        self.text = text
        self.text_files = {}
        if text is not None:
            self.text_files = {
                "tokens": open(directory / "raw" / f"{split}.txt", "wb"),
                "labels": open(directory / "raw" / f"{split}.labels.txt", "wb"),
            }
        self.num_lines = 0
        self.scored = 0
        self.ignore = vocab.ignore

    @property
    def num_tokens(self) -> int:
        return self.streams["tokens"].tokens

    def write(self, chunk: Chunk):
        for stream, symbols in (("tokens", chunk.tokens), ("labels", chunk.labels)):
            self.streams[stream].write(self.ids[symbols])
            if stream in self.text_files:
                self.text_files[stream].write(self.text.render(symbols, chunk.line_lengths))
        self.num_lines += len(chunk.line_lengths)
        self.scored += int((chunk.labels != self.ignore).sum())

    def close(self):
        for writer in self.streams.values():
            writer.close()
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


def generate_dataset(
    task: SyntheticTask,
    out: Path,
    sizes: Dict[str, int],
    seed: int,
    raw_text: bool = True,
    force: bool = False,
    check_only: bool = False,
) -> Optional[Dict[str, dict]]:
    """Generate every split of ``task`` into ``out`` (a fairseq data-bin directory); the statistics of each split.
    With ``check_only``, refuse what would fail (sizes, an output made otherwise) and write nothing.

    Written as every data directory of this project is (:class:`~fairseq_expire.prepare.output.DataDirectory`):
    a failed or interrupted run leaves nothing that looks finished, the same request again does nothing, and
    other options for an existing directory need ``force``. The recipe is everything that decides the bytes.
    """
    check_sizes(task, sizes)
    recipe = {
        **task.recipe(),
        **{f"{split}_tokens": size for split, size in sizes.items()},
        "seed": seed,
        "raw_text": raw_text,
    }
    data = DataDirectory(Path(out), task.name, recipe, force=force)
    record = data.finished()
    if check_only:
        return None
    if record is not None:
        logger.info(f"{out} already holds this {task.name} data: nothing to do")
        return record["splits"]
    with data:
        if raw_text:
            (data.work / "raw").mkdir()
        stats = {}
        dictionary = task_dictionary(task.vocab)
        text = TextRenderer(task.vocab) if raw_text else None
        for split, size in sizes.items():
            started = time.perf_counter()
            writer = LabelledSplitWriter(data.work, split, dictionary, task.vocab, text)
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
                counts = writer.streams["tokens"].counts
                for index in writer.ids:
                    dictionary.count[index] = int(counts[index])
            stats[split] = {"tokens": writer.num_tokens, "lines": writer.num_lines, "scored": writer.scored}
            logger.info(
                f"{task.name} {split}: {writer.num_tokens:,} tokens, {writer.scored:,} scored answers "
                f"({time.perf_counter() - started:.1f} s)"
            )
        readme = [
            f"The {task.name} task of the Expire-Span paper, generated with seed {seed}: tokens in "
            f"`{{split}}.bin`, the answer expected at each position in `{{split}}.labels.bin` (`{IGNORE}`: not "
            "scored)" + (", both as text in `raw/`." if raw_text else ".")
        ]
        data.finish(dictionary, stats, {"ignore_label": IGNORE}, readme)
    return stats
