"""Language modeling over contiguous streams, for models that carry memory across batches.

Training carries the memory through every batch of an epoch (block 0 of each epoch resets it); validation and
``fairseq-eval-lm`` make a full pass from a cold evaluation memory, which the model keeps apart from the training
one. Splits are fairseq-preprocess ``--only-source`` output; colon-separated data directories rotate per epoch
like fairseq's own LM task. See :mod:`fairseq_expire.data.streams` for how streams and blocks are cut.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.data import Dictionary, data_utils
from fairseq.data.indexed_dataset import get_available_dataset_impl
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from fairseq_expire.data.prompts import PromptDataset
from fairseq_expire.data.streams import (
    StreamBatches,
    StreamEpochBatchIterator,
    StreamSplit,
    TokenSequence,
    dictionary_fingerprint,
)
from fairseq_expire.errors import UsageError
from fairseq_expire.usage import CRITERION, TASK, batch_size_required

logger = logging.getLogger(__name__)


@dataclass
class LanguageModelingWithMemoryConfig(FairseqDataclass):
    data: str = field(
        default=MISSING,
        metadata={
            "help": "data directory made by `fairseq-preprocess --only-source` (dict.txt, SPLIT.bin/.idx); "
            "a colon-separated list of such directories gives one training shard per epoch, in turn"
        },
    )
    tokens_per_sample: int = field(
        default=512,
        metadata={"help": "block length M: tokens of each stream per batch (the model's segment length)"},
    )
    stream_offset: bool = field(
        default=False,
        metadata={
            "help": "training: start the streams at a random offset in [0, M) each epoch, so that blocks are not "
            "always cut at the same places (M - 1 tokens are left out per epoch)"
        },
    )
    reset_memory_every_block: bool = field(
        default=False,
        metadata={
            "help": "ablation: empty the memory before every block, so nothing is carried from one batch to the "
            "next (the model still attends within its block); the no-memory baseline"
        },
    )
    ignore_label: str = field(
        default="_",
        metadata={
            "help": "label streams (SPLIT.labels.bin/.idx, synthetic tasks): the label symbol of positions that "
            "are not scored; it must be in dict.txt"
        },
    )
    train_subset: str = II("dataset.train_subset")
    valid_subset: str = II("dataset.valid_subset")
    disable_validation: bool = II("dataset.disable_validation")
    batch_size: Optional[int] = II("dataset.batch_size")
    batch_size_valid: Optional[int] = II("dataset.batch_size_valid")
    world_size: int = II("distributed_training.distributed_world_size")
    context_window: int = II("eval_lm.context_window")
    dataset_impl: Optional[ChoiceEnum(get_available_dataset_impl())] = II("dataset.dataset_impl")


def _refuse_context_window(context_window) -> None:
    """fairseq-eval-lm's --context-window re-reads overlapping blocks; here the memory already carries the past
    (and eval-lm shortens the block by the window, which the model would refuse less clearly)."""
    if isinstance(context_window, int) and context_window > 0:
        raise UsageError(
            "--context-window does not apply to language_modeling_with_memory: the model carries its memory "
            "from block to block, so every token already sees the past up to the model's span. Leave out "
            "--context-window (and use the --tokens-per-sample the model was trained with)."
        )


@register_task(TASK, dataclass=LanguageModelingWithMemoryConfig)
class LanguageModelingWithMemoryTask(FairseqTask):
    """Each batch holds the next block of the same B streams per rank (``--batch-size`` B is required)."""

    def __init__(self, cfg: LanguageModelingWithMemoryConfig, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary
        self.dictionary_md5 = dictionary_fingerprint(dictionary)
        self.model_block_size = None  # set by build_model

    @classmethod
    def setup_task(cls, cfg: LanguageModelingWithMemoryConfig, **kwargs):
        for name in ("tokens_per_sample", "batch_size", "batch_size_valid"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value < 1:  # None: not given (the batch size is checked when used)
                raise UsageError(f"--{name.replace('_', '-')} {value}: must be an integer >= 1")
        _refuse_context_window(getattr(cfg, "context_window", 0))
        path = os.path.join(utils.split_paths(cfg.data)[0], "dict.txt")
        if not os.path.isfile(path):
            raise UsageError(
                f"{path} not found: the data directory must be made by `fairseq-preprocess --only-source "
                f"--trainpref TEXT --validpref TEXT --destdir {cfg.data}`"
            )
        dictionary = Dictionary.load(path)
        logger.info(f"dictionary: {len(dictionary)} types")
        return cls(cfg, dictionary)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        paths = utils.split_paths(self.cfg.data)
        self.datasets[split] = self._read_split(split, paths[(epoch - 1) % len(paths)], combine)
        logger.info(
            f"{split}: {len(self.datasets[split]):,} tokens"
            + (" with labels" if self.datasets[split].labelled else "")
        )

    def _check_training_data(self):
        """Read every split and shard the run will use and check that its streams fit, before the model is built:
        otherwise a bad shard or a too large --batch-size is found only when first used, perhaps after an epoch
        with nothing saved."""
        paths = utils.split_paths(self.cfg.data)
        uses = [(path, self.cfg.train_subset, True, self.cfg.batch_size) for path in paths]
        if not self.cfg.disable_validation:
            streams = self.cfg.batch_size_valid or self.cfg.batch_size
            uses += [(paths[0], split, False, streams) for split in self.cfg.valid_subset.split(",")]
        for data_path, split, training, streams_per_rank in uses:
            dataset = self._read_split(split, data_path, combine=training)
            offset = training and self.cfg.stream_offset
            self._check_streams(dataset, streams_per_rank, self.cfg.world_size, offset)

    def _read_split(self, split: str, data_path: str, combine: bool = False) -> StreamSplit:
        self._check_shard_dictionary(data_path)
        split_path = os.path.join(data_path, split)
        lines = data_utils.load_indexed_dataset(
            split_path, self.dictionary, self.cfg.dataset_impl, combine=combine
        )
        if lines is None:
            raise UsageError(
                f"split '{split}' not found: no {split_path}.bin/.idx. Binarize it into {data_path} with "
                f"`fairseq-preprocess --only-source --srcdict {os.path.join(data_path, 'dict.txt')} ...`, or "
                "name an existing split (--valid-subset, --gen-subset; --disable-validation to train without one)"
            )
        tokens = TokenSequence(lines)
        if len(tokens) <= self.cfg.tokens_per_sample:
            raise UsageError(
                f"--tokens-per-sample {self.cfg.tokens_per_sample} is larger than the split '{split}' "
                f"({len(tokens)} tokens in {split_path}): a block needs M + 1 tokens. Use a smaller "
                "--tokens-per-sample or more data."
            )
        labels = data_utils.load_indexed_dataset(
            split_path + ".labels", self.dictionary, self.cfg.dataset_impl, combine=combine
        )
        return StreamSplit(
            split, tokens, self.dictionary.pad(), *self._label_stream(labels, lines, split_path)
        )

    def dataset(self, split: str) -> StreamSplit:
        """The split's tokens; :meth:`get_batch_iterator` makes the batches (they depend on ranks and epoch)."""
        if split not in self.datasets:
            raise KeyError(f"split '{split}' is not loaded")
        return self.datasets[split]

    def _check_shard_dictionary(self, data_path: str):
        """Every data directory must use the first one's dictionary (it is the one the model is built with)."""
        path = os.path.join(data_path, "dict.txt")
        if os.path.isfile(path) and dictionary_fingerprint(Dictionary.load(path)) != self.dictionary_md5:
            first = os.path.join(utils.split_paths(self.cfg.data)[0], "dict.txt")
            raise UsageError(
                f"{path} differs from {first}: binarize every shard with the same dictionary "
                f"(`fairseq-preprocess --only-source --srcdict {first} ...`)"
            )

    def _label_stream(self, labels, lines, split_path: str):
        """(labels, index of the ignore symbol) for a split that has a label stream, else (None, None)."""
        if labels is None:
            return None, None
        if len(labels.sizes) != len(lines.sizes) or (labels.sizes != lines.sizes).any():
            raise UsageError(
                f"{split_path}.labels has {int(labels.sizes.sum())} labels in {len(labels.sizes)} lines but the "
                f"split has {int(lines.sizes.sum())} tokens in {len(lines.sizes)} lines: a label stream needs one "
                "label per token, line by line"
            )
        ignore_index = self.dictionary.index(self.cfg.ignore_label)
        if ignore_index == self.dictionary.unk() and self.cfg.ignore_label != self.dictionary.unk_word:
            raise UsageError(
                f"--ignore-label '{self.cfg.ignore_label}' is not in the dictionary: labelled data must have its "
                "ignore symbol in dict.txt (or pass the --ignore-label the data uses)"
            )
        return TokenSequence(labels), ignore_index

    def get_batch_iterator(self, dataset, **options):
        """An iterator over this rank's batches of ``max_sentences`` streams (fairseq's ``--batch-size``).

        ``num_shards`` / ``shard_id`` are the data-parallel world size and rank; every rank gets its own streams
        and the same number of batches. Shuffling does not apply: batches must come in stream order. Options that
        size or order fairseq's batches (``max_tokens``, ``required_batch_size_multiple``...) do not apply either.
        """
        if not isinstance(dataset, StreamSplit):  # prompts (fairseq-interactive, the hub): fairseq's batches
            return super().get_batch_iterator(dataset, **options)
        random_offset = self.cfg.stream_offset and dataset.name == self.cfg.train_subset
        return self._stream_iterator(
            dataset,
            options.get("max_sentences"),
            options.get("num_shards", 1),
            options.get("shard_id", 0),
            options.get("epoch", 1),
            offset_seed=options.get("seed", 1) if random_offset else None,
            num_workers=options.get("num_workers", 0),
            buffer_size=options.get("data_buffer_size", 0),
            skip_remainder_batch=options.get("skip_remainder_batch", False),
        )

    def _stream_iterator(
        self, split: StreamSplit, streams_per_rank, num_ranks, rank, epoch, offset_seed, **iterator_options
    ):
        if self.model_block_size not in (None, self.cfg.tokens_per_sample):
            raise UsageError(
                f"--tokens-per-sample {self.cfg.tokens_per_sample}, but the checkpoint's model was trained with "
                f"--tokens-per-sample {self.model_block_size} (its relative-position table covers one block): "
                f"use --tokens-per-sample {self.model_block_size}"
            )
        self._check_streams(split, streams_per_rank, num_ranks, offset_seed is not None)
        streams = streams_per_rank * num_ranks
        batches = StreamBatches(
            split,
            streams_per_rank,
            num_ranks,
            rank,
            self.cfg.tokens_per_sample,
            offset_seed=offset_seed,
            epoch=epoch,
            reset_every_block=self.cfg.reset_memory_every_block,
        )
        if batches.layout.shortest_stream <= self.cfg.tokens_per_sample:
            logger.warning(
                f"split '{split.name}': {streams} streams of {batches.layout.shortest_stream} tokens fit in one "
                f"block of {self.cfg.tokens_per_sample}: no memory is carried to a later batch. Use a smaller "
                "--batch-size or --tokens-per-sample."
            )
        logger.info(
            f"split '{split.name}': {streams} streams of ~{batches.layout.shortest_stream} tokens "
            f"({streams_per_rank} on this rank), {len(batches)} batches of {self.cfg.tokens_per_sample} tokens per "
            "stream"
        )
        return StreamEpochBatchIterator(
            dataset=batches,
            collate_fn=batches.collater,
            batch_sampler=[[k] for k in range(len(batches))],
            epoch=epoch,
            disable_shuffling=True,
            **iterator_options,
        )

    def _check_streams(self, split: StreamSplit, streams_per_rank, num_ranks: int, offset: bool):
        if streams_per_rank is None:
            raise UsageError(batch_size_required(utils.split_paths(self.cfg.data)[0]))
        streams = streams_per_rank * num_ranks
        usable = len(split) - (self.cfg.tokens_per_sample - 1 if offset else 0)
        if usable < 2 * streams:
            raise UsageError(
                f"--batch-size {streams_per_rank} x {num_ranks} processes = {streams} streams over the "
                f"{usable} usable tokens of split '{split.name}': streams would be empty. Use at most "
                f"--batch-size {max(usable // (2 * num_ranks), 1)} (better: streams of many blocks)."
            )

    def eval_lm_dataloader(
        self,
        dataset: StreamSplit,
        max_tokens: Optional[int] = None,
        batch_size: Optional[int] = None,
        max_positions: Optional[int] = None,
        num_shards: int = 1,
        shard_id: int = 0,
        num_workers: int = 1,
        data_buffer_size: int = 10,
        context_window: int = 0,
    ):
        """``fairseq-eval-lm``: ``--batch-size`` streams, scored from a cold memory, every token but the
        streams' first."""
        _refuse_context_window(context_window)
        if dataset.labelled:
            raise UsageError(
                f"split '{dataset.name}' has a label stream: fairseq-eval-lm scores every next token and cannot "
                "score labels. The acc/err of labelled data are logged by validation (fairseq-train's valid "
                "records, or fairseq-validate)."
            )
        return self._stream_iterator(
            dataset,
            batch_size,
            num_shards,
            shard_id,
            epoch=1,
            offset_seed=None,
            num_workers=num_workers,
            buffer_size=data_buffer_size,
        ).next_epoch_itr(shuffle=False)

    def build_model(self, cfg, from_checkpoint=False):
        """Refuse a model without memory, and in training every split and shard that would fail later, before the
        model is built. The block length of a checkpoint's model is checked where streams are cut into blocks
        (generation reads prompts of any length)."""
        arch = getattr(cfg, "_name", None)
        if not callable(getattr(ARCH_MODEL_REGISTRY.get(arch), "reset_memory", None)):
            raise UsageError(
                f"--task {TASK} feeds consecutive blocks of the same streams and needs a model that carries "
                f"memory across them (--arch expire_span_lm, fixed_span_lm, adaptive_span_lm, compressive_lm or "
                f"one of their presets), not --arch {arch}"
            )
        if not from_checkpoint:
            self._check_training_data()
        model = super().build_model(cfg, from_checkpoint)
        self.model_block_size = model.decoder.block_size
        return model

    def build_criterion(self, cfg, **kwargs):
        """Only the Expire-Span criterion adds the span loss and logs spans and memory; refuse any other."""
        if cfg._name != CRITERION:
            raise UsageError(
                f"--task {TASK} trains with --criterion {CRITERION} (the span loss, and the span and memory "
                f"logs), not --criterion {cfg._name}"
            )
        return super().build_criterion(cfg, **kwargs)

    def max_positions(self):
        return None  # streams have any length; the block length is --tokens-per-sample

    def build_dataset_for_inference(self, src_tokens, src_lengths, **kwargs):
        """Prompts, each a new stream after ``</s>`` (fairseq-interactive, the hub's ``.sample()``/``.score()``)."""
        return PromptDataset(src_tokens, self.dictionary.eos(), self.dictionary.pad())

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        """Generation continues each prompt: its tokens are forced as the generator's prefix, after ``</s>``."""
        if constraints is not None:
            raise UsageError("--constraints does not apply to language models: leave it out")
        if prefix_tokens is None:
            prefix_tokens = sample["net_input"]["src_tokens"][:, 1:]  # without the leading </s>
        with torch.no_grad():
            return generator.generate(
                models, sample, prefix_tokens=prefix_tokens, bos_token=self.dictionary.eos()
            )

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary
