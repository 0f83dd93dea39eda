"""Contiguous token streams for models that carry memory from one batch to the next.

fairseq's LM task serves independent, shuffled blocks; a memory model needs row b of batch k+1 to continue row b
of batch k. So a split is read as one token sequence, cut into ``B x W`` contiguous streams (B per data-parallel
rank, W ranks), and one dataset item is one whole batch: block k of each of the rank's streams (the design of
fairseq's examples/truncated_bptt, without its scoring bugs: here every token of a stream but its first is a
target exactly once, and pad targets are never counted).
"""

import hashlib
import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from fairseq.data import FairseqDataset, data_utils, iterators

from fairseq_expire.errors import UsageError

logger = logging.getLogger(__name__)


def dictionary_fingerprint(dictionary) -> str:
    """Identifies a vocabulary by its symbols in order: equal fingerprints map token ids to the same symbols."""
    return hashlib.md5("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class StreamLayout:
    """Where the streams lie in a split and how they are cut into blocks (arithmetic only, no data).

    The tokens ``[start, start + length)`` are cut into ``num_streams`` contiguous streams whose lengths differ by
    at most one (the first ``length % num_streams`` are one longer). Block k of a stream feeds its tokens
    ``[k*M, (k+1)*M)`` as input and has ``[k*M+1, (k+1)*M+1)`` as target, so every token but the stream's first is
    a target exactly once. All streams get the same number of blocks (the longest stream's); short rows are
    padded at their end.
    """

    start: int
    length: int
    num_streams: int
    block_size: int

    def __post_init__(self):
        if self.num_streams < 1 or self.block_size < 1 or self.length < 2 * self.num_streams:
            raise ValueError(f"no stream would have a target: {self}")

    def stream(self, index: int) -> Tuple[int, int]:
        """Token range ``[begin, end)`` of stream ``index`` in the split."""
        base, longer = divmod(self.length, self.num_streams)
        begin = self.start + index * base + min(index, longer)
        return begin, begin + base + int(index < longer)

    @property
    def shortest_stream(self) -> int:
        return self.length // self.num_streams

    @property
    def num_blocks(self) -> int:
        longest = -(-self.length // self.num_streams)
        return -(-(longest - 1) // self.block_size)

    def block(self, index: int, k: int) -> Tuple[int, int]:
        """Tokens ``[first, last)`` that block k of stream ``index`` reads: its inputs are the first M of them,
        its targets all but the first (at most M + 1 tokens, fewer at the stream's end)."""
        begin, end = self.stream(index)
        first = min(begin + k * self.block_size, end)
        return first, min(first + self.block_size + 1, end)


class TokenSequence:
    """A binarized split (fairseq-preprocess lines, each ending in ``</s>``) read as one sequence of tokens."""

    def __init__(self, lines):
        self.lines = lines
        self.line_starts = np.concatenate([[0], np.cumsum(lines.sizes, dtype=np.int64)])

    @classmethod
    def in_memory(cls, tokens: torch.Tensor) -> "TokenSequence":
        """``tokens`` (N) as a sequence of one line: a text the analysis tools run without binarizing it."""
        return cls(_Lines([tokens.long()]))

    def __len__(self) -> int:
        return int(self.line_starts[-1])

    def read(self, begin: int, end: int) -> torch.Tensor:
        """Tokens ``[begin, end)`` as a LongTensor, across line boundaries."""
        if end <= begin:
            return torch.empty(0, dtype=torch.long)
        first_line = int(np.searchsorted(self.line_starts, begin, side="right")) - 1
        end_line = int(np.searchsorted(self.line_starts, end, side="left"))
        tokens = torch.cat([self.lines[i].long() for i in range(first_line, end_line)])
        skip = begin - int(self.line_starts[first_line])
        return tokens[skip : skip + end - begin]


class _Lines(list):
    """Lines held in memory, with the ``sizes`` of fairseq's indexed datasets."""

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(line) for line in self], dtype=np.int64)


class StreamSplit:
    """The task's dataset for one split: its tokens and, for synthetic tasks, a label per token.

    With labels, the target of the token at position j is ``label[j]`` (the label of the token it predicts), and
    labels equal to ``ignore_index`` become ``pad`` (not scored).
    """

    def __init__(
        self,
        name: str,
        tokens: TokenSequence,
        pad: int,
        labels: Optional[TokenSequence] = None,
        ignore_index: Optional[int] = None,
    ):
        self.name = name
        self.tokens = tokens
        self.pad = pad
        self.labels = labels
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def read(self, first: int, last: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[first, last)`` and the targets of all but the last of them."""
        tokens = self.tokens.read(first, last)
        if self.labels is None:
            return tokens, tokens[1:]
        labels = self.labels.read(first + 1, last)
        return tokens, labels.masked_fill(labels.eq(self.ignore_index), self.pad)


class StreamBatches(FairseqDataset):
    """Item k is the whole batch k of one rank: block k of each of its ``streams_per_rank`` streams.

    The rank owns streams ``[rank * B, (rank + 1) * B)`` of ``B * num_ranks``, so all ranks see different streams
    and the same number of batches. With ``offset_seed`` (training), the streams start at a random offset in
    ``[0, M)`` drawn per epoch, so blocks are not cut at the same places every epoch; ``M - 1`` tokens are then
    left out each epoch, which keeps the number of batches the same in every epoch.
    """

    def __init__(
        self,
        split: StreamSplit,
        streams_per_rank: int,
        num_ranks: int,
        rank: int,
        block_size: int,
        offset_seed: Optional[int] = None,
        epoch: int = 1,
        reset_every_block: bool = False,
    ):
        super().__init__()
        self.split = split
        self.reset_every_block = reset_every_block
        self.streams_per_rank = streams_per_rank
        self.num_ranks = num_ranks
        self.rank = rank
        self.block_size = block_size
        self.offset_seed = offset_seed
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int):
        start, length = 0, len(self.split)
        if self.offset_seed is not None:
            length -= self.block_size - 1
            with data_utils.numpy_seed(self.offset_seed, epoch):
                start = int(np.random.randint(self.block_size))
        self.layout = StreamLayout(start, length, self.streams_per_rank * self.num_ranks, self.block_size)

    @property
    def streams(self) -> range:
        return range(self.rank * self.streams_per_rank, (self.rank + 1) * self.streams_per_rank)

    def __len__(self) -> int:
        return self.layout.num_blocks

    def __getitem__(self, k: int) -> dict:
        B, M, pad = self.streams_per_rank, self.block_size, self.split.pad
        src_tokens = torch.full((B, M), pad, dtype=torch.long)
        target = torch.full((B, M), pad, dtype=torch.long)
        src_lengths = torch.zeros(B, dtype=torch.long)
        for row, stream in enumerate(self.streams):
            tokens, targets = self.split.read(*self.layout.block(stream, k))
            inputs = tokens[:M]
            src_tokens[row, : len(inputs)] = inputs
            src_lengths[row] = len(inputs)
            target[row, : len(targets)] = targets
        return {
            "id": torch.tensor(self.streams, dtype=torch.long),
            "nsentences": B,
            "ntokens": int(target.ne(pad).sum()),
            "net_input": {
                "src_tokens": src_tokens,
                "src_lengths": src_lengths,
                "reset_memory": k == 0 or self.reset_every_block,
            },
            "target": target,
            "labelled": self.split.labelled,
        }

    def collater(self, samples):
        """Items are whole batches already (the batch sampler gives one item per batch)."""
        return samples[0]

    def describe(self) -> dict:
        """What a saved position in this epoch means; a resume must see the same to continue the same streams."""
        return {
            "split_tokens": len(self.split),
            "streams_per_rank": self.streams_per_rank,
            "ranks": self.num_ranks,
            "tokens_per_sample": self.block_size,
            "stream_offset": self.offset_seed is not None,
            "stream_start": self.layout.start,
        }


_OPTION_OF = {
    "split_tokens": "the training data (tokens in the split)",
    "streams_per_rank": "--batch-size",
    "ranks": "the data-parallel world size (number of processes)",
    "tokens_per_sample": "--tokens-per-sample",
    "stream_offset": "--stream-offset",
    "stream_start": "the streams' start, drawn by --stream-offset from --seed",
}


class StreamEpochBatchIterator(iterators.EpochBatchIterator):
    """fairseq's epoch iterator over :class:`StreamBatches`; its saved position also records the stream layout,
    so that a resume with another layout is explained instead of continuing misaligned streams."""

    def state_dict(self):
        return {**super().state_dict(), "streams": self.dataset.describe()}

    def load_state_dict(self, state_dict):
        saved = state_dict.get("streams")
        position = state_dict.get("iterations_in_epoch", 0)
        if saved is not None:
            self._check_resume(saved, state_dict["epoch"], position)
        super().load_state_dict(state_dict)
        if position > 0:
            logger.info(
                f"resuming epoch {self.epoch} at batch {position + 1} of {len(self)}: the same streams continue, "
                "but the memory was not saved and starts empty (one cold segment)"
            )

    def _check_resume(self, saved: dict, epoch: int, position: int):
        now = self.dataset.describe()
        changed = [
            f"{_OPTION_OF[key]}: {saved[key]} in the checkpoint, {now[key]} now"
            for key in _OPTION_OF
            if key in saved and saved[key] != now[key]
        ]
        if changed and position > 0:
            raise UsageError(
                f"cannot resume mid-epoch: the checkpoint stopped after batch {position} of epoch "
                f"{epoch} with another stream layout ({'; '.join(changed)}), so its "
                "position would point into different streams. Resume with the same settings, or pass "
                "--reset-dataloader to start the streams of a new epoch from their beginning."
            )
        if changed:
            logger.info(
                f"stream layout changed at an epoch boundary ({'; '.join(changed)}): nothing to realign"
            )
