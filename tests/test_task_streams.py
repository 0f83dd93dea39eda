"""Streams and the language_modeling_with_memory task, in-process: how a split is cut, served, resumed, refused."""

import pickle
import random
from pathlib import Path

import pytest
import torch
from console import REPO, make_data_bin, run
from fairseq import options, tasks
from fairseq.data import Dictionary, indexed_dataset
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from test_synthetic_common import generate

import fairseq_expire  # noqa: F401  (registers the model and criterion)
from fairseq_expire.data.streams import StreamBatches, StreamSplit, TokenSequence
from fairseq_expire.errors import UsageError
from fairseq_expire.tasks.language_modeling_with_memory import (
    LanguageModelingWithMemoryConfig,
    LanguageModelingWithMemoryTask,
)

PAD, FIRST_ID = 1, 4  # fairseq dictionaries: <s> <pad> </s> <unk>, then symbols


def write_split(prefix: Path, lines, vocab_size: int) -> Path:
    """A split in fairseq's binary format (mmap .bin/.idx), written directly."""
    builder = indexed_dataset.make_builder(f"{prefix}.bin", impl="mmap", vocab_size=vocab_size)
    for line in lines:
        builder.add_item(torch.tensor(line, dtype=torch.long))
    builder.finalize(f"{prefix}.idx")
    return prefix


def numbered_split(prefix: Path, n_tokens: int, seed: int = 0) -> TokenSequence:
    """Tokens FIRST_ID, FIRST_ID + 1, ... (a token's value gives its position) in lines of random lengths."""
    rng, lines, position = random.Random(seed), [], 0
    while position < n_tokens:
        length = min(rng.randint(1, 23), n_tokens - position)
        lines.append(list(range(FIRST_ID + position, FIRST_ID + position + length)))
        position += length
    write_split(prefix, lines, vocab_size=FIRST_ID + n_tokens)
    return TokenSequence(indexed_dataset.MMapIndexedDataset(str(prefix)))


def rank_batches(split, streams_per_rank, num_ranks, block, **kwargs):
    return [
        StreamBatches(split, streams_per_rank, num_ranks, rank, block, **kwargs) for rank in range(num_ranks)
    ]


def reassemble(batches: StreamBatches):
    """{global stream id: (inputs, targets)} concatenated over the epoch, checking every batch on the way."""
    rows = {}
    for k in range(len(batches)):
        sample = batches[k]
        src, target = sample["net_input"]["src_tokens"], sample["target"]
        lengths = sample["net_input"]["src_lengths"]
        assert sample["net_input"]["reset_memory"] == (k == 0)
        assert sample["ntokens"] == int(target.ne(PAD).sum())
        assert src.shape == target.shape == (batches.streams_per_rank, batches.block_size)
        for row, stream in enumerate(sample["id"].tolist()):
            n = int(lengths[row])
            scored = int(target[row].ne(PAD).sum())
            assert src[row, n:].eq(PAD).all() and target[row, scored:].eq(PAD).all()  # pads only at the end
            assert scored in (n, n - 1)  # a stream's last token has no target
            assert torch.equal(target[row, : n - 1], src[row, 1:n])  # next-token targets
            inputs, targets = rows.setdefault(stream, ([], []))
            inputs.append(src[row, :n])
            targets.append(target[row, :scored])
    return {stream: (torch.cat(inputs), torch.cat(targets)) for stream, (inputs, targets) in rows.items()}


@pytest.mark.parametrize(
    "n_tokens, streams_per_rank, num_ranks, block",
    [(1000, 1, 1, 16), (997, 3, 1, 7), (1001, 2, 2, 16), (503, 5, 3, 4), (97, 4, 2, 1), (230, 1, 3, 64)],
)
def test_streams_are_contiguous_slices_that_cover_the_split(
    tmp_path, n_tokens, streams_per_rank, num_ranks, block
):
    tokens = numbered_split(tmp_path / "train", n_tokens)
    split = StreamSplit("train", tokens, PAD)
    ranks = rank_batches(split, streams_per_rank, num_ranks, block)
    assert len({len(batches) for batches in ranks}) == 1  # the same number of batches on every rank

    streams = {}
    for rank, batches in enumerate(ranks):
        seen = reassemble(batches)
        assert sorted(seen) == list(range(rank * streams_per_rank, (rank + 1) * streams_per_rank))
        streams.update(seen)
    position = 0
    for stream in range(streams_per_rank * num_ranks):
        inputs, targets = streams[stream]
        tokens = torch.cat([inputs[:1], targets])  # the stream: its first token, then every token as a target
        expected = torch.arange(position, position + len(tokens)) + FIRST_ID
        assert torch.equal(tokens, expected)  # a contiguous slice, continuing where the previous stream ended
        assert torch.equal(inputs, expected[: len(inputs)]) and len(inputs) >= len(tokens) - 1
        assert abs(len(tokens) - n_tokens / (streams_per_rank * num_ranks)) < 1
        position += len(tokens)
    assert position == n_tokens  # nothing dropped, nothing read twice


def test_random_offset_moves_the_cuts_each_epoch_and_keeps_the_batch_count(tmp_path):
    n_tokens, block = 1000, 16
    split = StreamSplit("train", numbered_split(tmp_path / "train", n_tokens), PAD)
    starts = set()
    for epoch in range(1, 9):
        ranks = rank_batches(split, 2, 2, block, offset_seed=7, epoch=epoch)
        assert {len(batches) for batches in ranks} == {len(ranks[0])}
        streams = {}
        for batches in ranks:
            streams.update(reassemble(batches))
        tokens = torch.cat([torch.cat([streams[s][0][:1], streams[s][1]]) for s in range(4)])
        start = int(tokens[0]) - FIRST_ID
        assert 0 <= start < block
        assert torch.equal(tokens, torch.arange(start, start + n_tokens - (block - 1)) + FIRST_ID)
        starts.add(start)
        if epoch == 1:
            batch_count = len(ranks[0])
        assert len(ranks[0]) == batch_count
    assert len(starts) > 1
    # set_epoch (what fairseq's iterator calls) gives the same layout as building for that epoch
    batches = rank_batches(split, 2, 2, block, offset_seed=7, epoch=1)[0]
    batches.set_epoch(5)
    assert batches.layout == rank_batches(split, 2, 2, block, offset_seed=7, epoch=5)[0].layout


def test_label_stream_gives_the_targets_and_unscored_positions_become_pad(tmp_path):
    ignore = FIRST_ID + 10  # not among the scored labels FIRST_ID + (j % 7)
    tokens = numbered_split(tmp_path / "train", 200)
    labels = [[FIRST_ID + (j % 7) if j % 3 else ignore for j in range(200)]]
    write_split(tmp_path / "labels", labels, vocab_size=FIRST_ID + 200)
    label_seq = TokenSequence(indexed_dataset.MMapIndexedDataset(str(tmp_path / "labels")))
    split = StreamSplit("train", tokens, PAD, labels=label_seq, ignore_index=ignore)
    batches = StreamBatches(split, 2, 1, 0, 16)
    scored = 0
    for k in range(len(batches)):
        sample = batches[k]
        assert sample["labelled"]
        assert sample["ntokens"] == int(sample["target"].ne(PAD).sum())
        scored += sample["ntokens"]
        for row in range(2):
            src, target = sample["net_input"]["src_tokens"][row], sample["target"][row]
            for i in range(int(sample["net_input"]["src_lengths"][row]) - 1):
                j = int(src[i]) - FIRST_ID + 1  # position of the token that input i predicts
                assert int(target[i]) == (PAD if j % 3 == 0 else FIRST_ID + j % 7)
    positions_predicted = [j for j in range(200) if j not in (0, 100)]
    assert scored == sum(1 for j in positions_predicted if j % 3)


# The task itself, on data made by the real fairseq-preprocess.


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory):
    rng = random.Random(0)
    text = "".join(rng.choice("abcdefgh ") for _ in range(3000))
    return make_data_bin(tmp_path_factory.mktemp("streams"), text, text[:801], line_length=37)


def task_config(data, block=16, **options) -> LanguageModelingWithMemoryConfig:
    """The task's options as fairseq-train resolves them (the CLI tests run the real command line)."""
    resolved = dict(
        train_subset="train", valid_subset="valid", disable_validation=False, world_size=1, context_window=0
    )
    resolved.update(batch_size=None, batch_size_valid=None, dataset_impl=None)
    return LanguageModelingWithMemoryConfig(
        data=str(data), tokens_per_sample=block, **{**resolved, **options}
    )


def loaded_task(data, split="train", block=16, **options) -> LanguageModelingWithMemoryTask:
    task = LanguageModelingWithMemoryTask.setup_task(task_config(data, block, **options))
    task.load_dataset(split)
    return task


def all_tokens(data: Path, split: str) -> torch.Tensor:
    lines = indexed_dataset.MMapIndexedDataset(str(data / split))
    return torch.cat([lines[i] for i in range(len(lines))]).long()


def test_task_serves_each_rank_its_streams_of_the_split(data_bin):
    task = loaded_task(data_bin, "valid")
    expected = torch.tensor_split(all_tokens(data_bin, "valid"), 6)  # lengths differ by at most one
    total, counts = 0, set()
    for rank in range(2):
        itr = task.get_batch_iterator(task.dataset("valid"), max_sentences=3, num_shards=2, shard_id=rank)
        counts.add(len(itr))
        batches = list(itr.next_epoch_itr(shuffle=False))
        assert all(batch["id"].tolist() == [3 * rank, 3 * rank + 1, 3 * rank + 2] for batch in batches)
        total += sum(batch["ntokens"] for batch in batches)
        for row in range(3):
            stream = torch.cat(
                [b["net_input"]["src_tokens"][row, : b["net_input"]["src_lengths"][row]] for b in batches]
            )
            assert torch.equal(stream, expected[3 * rank + row])
    assert len(counts) == 1
    assert total == len(task.dataset("valid")) - 6


def test_colon_separated_data_directories_rotate_per_epoch(data_bin, tmp_path):
    second = tmp_path / "second"
    (tmp_path / "second.txt").write_text("a b c d e f g h\n" * 40)
    run(
        "fairseq-preprocess",
        "--only-source",
        "--srcdict",
        data_bin / "dict.txt",
        "--trainpref",
        tmp_path / "second.txt",
        "--destdir",
        second,
        "--workers",
        1,
    )
    task = LanguageModelingWithMemoryTask.setup_task(task_config(f"{data_bin}:{second}"))
    lengths = []
    for epoch in (1, 2, 3):
        task.load_dataset("train", epoch=epoch)
        lengths.append(len(task.dataset("train")))
    assert lengths == [len(all_tokens(data_bin, "train")), 40 * 9, len(all_tokens(data_bin, "train"))]

    other = tmp_path / "other"  # the second directory's data, under another dictionary
    other.mkdir()
    for name in ("train.bin", "train.idx"):
        (other / name).write_bytes((second / name).read_bytes())
    (other / "dict.txt").write_text("x 5\ny 3\n")
    task = LanguageModelingWithMemoryTask.setup_task(task_config(f"{data_bin}:{other}"))
    with pytest.raises(ValueError, match="differs from .*--srcdict"):
        task.load_dataset("train", epoch=2)


def test_missing_split_is_named_with_the_fix(data_bin):
    with pytest.raises(UsageError, match="split 'test' not found.*fairseq-preprocess --only-source"):
        loaded_task(data_bin, "test")


def test_block_longer_than_the_data_is_refused(data_bin):
    with pytest.raises(ValueError, match="--tokens-per-sample 4096 is larger than the split 'valid'"):
        loaded_task(data_bin, "valid", block=4096)


def test_batch_size_missing_or_too_large_is_refused(data_bin):
    task = loaded_task(data_bin, "valid")
    with pytest.raises(ValueError, match="--batch-size N is required"):
        task.get_batch_iterator(task.dataset("valid"), max_sentences=None)
    most = len(task.dataset("valid")) // 4
    with pytest.raises(ValueError, match=f"streams would be empty. Use at most --batch-size {most}"):
        task.get_batch_iterator(task.dataset("valid"), max_sentences=most + 1, num_shards=2)
    task.get_batch_iterator(task.dataset("valid"), max_sentences=most, num_shards=2)


def labelled_copy(data_bin: Path, directory: Path, labels_of_line) -> Path:
    """The valid split of ``data_bin`` with a label stream, ``labels_of_line(size)`` labels per line."""
    directory.mkdir()
    for name in ("dict.txt", "valid.bin", "valid.idx"):
        (directory / name).write_bytes((data_bin / name).read_bytes())
    lines = indexed_dataset.MMapIndexedDataset(str(data_bin / "valid"))  # .sizes lives in its mmap
    write_split(
        directory / "valid.labels", [labels_of_line(int(size)) for size in lines.sizes], vocab_size=100
    )
    return directory


def test_label_streams_must_match_the_split_and_have_the_ignore_symbol(data_bin, tmp_path):
    dictionary = Dictionary.load(str(data_bin / "dict.txt"))
    a, b = dictionary.index("a"), dictionary.index("b")
    for name, wrong_length in (
        ("short", lambda size: [a] * (size - 1)),
        ("long", lambda size: [a, b] * size),
    ):
        with pytest.raises(ValueError, match="one label per token"):
            loaded_task(labelled_copy(data_bin, tmp_path / name, wrong_length), "valid")

    data = labelled_copy(data_bin, tmp_path / "right", lambda size: ([a, b] * size)[:size])
    with pytest.raises(ValueError, match="--ignore-label '_' is not in the dictionary"):
        loaded_task(data, "valid")
    task = loaded_task(data, "valid", ignore_label="b")
    sample = next(iter(task.get_batch_iterator(task.dataset("valid"), max_sentences=2).next_epoch_itr()))
    assert sample["labelled"] and set(sample["target"].unique().tolist()) <= {a, PAD}
    with pytest.raises(ValueError, match="eval-lm .* cannot score labels"):
        task.eval_lm_dataloader(task.dataset("valid"), batch_size=2)


def same_batches(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert torch.equal(a["net_input"]["src_tokens"], b["net_input"]["src_tokens"])
        assert torch.equal(a["target"], b["target"])


def test_resume_continues_at_the_next_block_of_the_same_streams(data_bin):
    """Epoch 2 with random offsets; batches also come out the same from a pickled copy, as DataLoader workers
    (fairseq-train's default --num-workers 1) get them."""
    task = loaded_task(data_bin, "train", stream_offset=True)
    train = task.dataset("train")

    def iterator(**kwargs):
        return task.get_batch_iterator(train, max_sentences=3, seed=3, **kwargs)

    uninterrupted = list(iterator(epoch=2).next_epoch_itr())
    itr = iterator(epoch=1)
    list(itr.next_epoch_itr())
    epoch = itr.next_epoch_itr()  # the same iterator moves on to epoch 2: the same batches as a fresh one
    same_batches(uninterrupted[:5], [next(epoch) for _ in range(5)])
    saved = itr.state_dict()
    assert (
        saved["epoch"] == 2
        and saved["iterations_in_epoch"] == 5
        and saved["streams"]["streams_per_rank"] == 3
    )

    resumed = iterator(epoch=saved["epoch"])
    resumed.load_state_dict(saved)
    same_batches(uninterrupted[5:], list(resumed.next_epoch_itr()))
    in_worker = pickle.loads(pickle.dumps(resumed.dataset))
    same_batches(uninterrupted, [in_worker[k] for k in range(len(in_worker))])


@pytest.mark.parametrize(
    "change, named",
    [({"max_sentences": 4}, "--batch-size: 3 in the checkpoint, 4 now"), ({"num_shards": 2}, "world size")],
)
def test_resume_with_another_layout_is_explained(data_bin, change, named):
    task = loaded_task(data_bin, "train")
    itr = task.get_batch_iterator(task.dataset("train"), max_sentences=3)
    epoch = itr.next_epoch_itr()
    next(epoch)
    mid_epoch, end_of_epoch = itr.state_dict(), {**itr.state_dict(), "iterations_in_epoch": 0, "epoch": 2}
    other = task.get_batch_iterator(task.dataset("train"), **{"max_sentences": 3, **change})
    with pytest.raises(ValueError, match=f"cannot resume mid-epoch.*{named}.*--reset-dataloader"):
        other.load_state_dict(mid_epoch)
    other.load_state_dict(end_of_epoch)  # a new epoch starts the streams afresh: nothing to realign
    assert next(iter(other.next_epoch_itr()))["net_input"]["reset_memory"]


def test_resume_with_stream_offsets_drawn_from_another_seed_is_refused(data_bin):
    task = loaded_task(data_bin, "train", stream_offset=True)
    starts = {
        seed: task.get_batch_iterator(task.dataset("train"), max_sentences=3, seed=seed).dataset.layout.start
        for seed in (1, 2, 3)
    }
    other_seed = next(seed for seed in (2, 3) if starts[seed] != starts[1])
    itr = task.get_batch_iterator(task.dataset("train"), max_sentences=3, seed=1)
    next(itr.next_epoch_itr())
    with pytest.raises(
        ValueError,
        match=f"cannot resume mid-epoch.*--seed: {starts[1]} in the checkpoint, {starts[other_seed]} now",
    ):
        task.get_batch_iterator(task.dataset("train"), max_sentences=3, seed=other_seed).load_state_dict(
            itr.state_dict()
        )


def parsed_training_config(data, arch, *extra):
    """The whole fairseq-train configuration, as the command line gives it."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [str(data), "--user-dir", str(REPO / "fairseq_expire"), "--task", "language_modeling_with_memory"]
        + ["--arch", arch, "--criterion", "expire_span_cross_entropy", "--tokens-per-sample", "16"]
        + ["--batch-size", "4", *extra],
    )
    return convert_namespace_to_omegaconf(args)


def test_only_the_expire_span_criterion_is_accepted(data_bin):
    cfg = parsed_training_config(data_bin, "fixed_span_lm_tiny")
    task = tasks.setup_task(cfg.task)
    task.build_model(cfg.model)
    cfg.criterion._name = "cross_entropy"
    with pytest.raises(UsageError, match="trains with --criterion expire_span_cross_entropy .*cross_entropy"):
        task.build_criterion(cfg.criterion)
    cfg.criterion._name = "expire_span_cross_entropy"
    assert type(task.build_criterion(cfg.criterion)).__name__ == "ExpireSpanCrossEntropyCriterion"


@pytest.mark.parametrize("labelled", [False, True])
def test_loss_is_the_nll_plus_alpha_times_the_span_loss_per_stream_position(data_bin, tmp_path, labelled):
    """Paper 4.1: ``L_task + alpha * sum_i e_i / T`` with T the stream positions, also where only answers are
    scored: fairseq divides the loss by the scored tokens, so the span loss is scaled by scored / positions.
    """
    data = generate(tmp_path, "corridor") if labelled else data_bin
    spans_of_8 = ("--max-span", "32", "--expire-span-init-percentage", "0.25")  # keys 9-15 back: on the ramp
    cfg = parsed_training_config(data, "expire_span_lm_tiny", "--expire-span-alpha", "0.5", *spans_of_8)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    sample = next(iter(task.get_batch_iterator(task.dataset("train"), max_sentences=4).next_epoch_itr()))
    assert sample["net_input"]["reset_memory"]  # so that the model gives the same output again below
    loss, sample_size, logging_output = criterion(model, sample)

    logits, extra = model(**sample["net_input"])
    target = sample["target"]
    scored = target.ne(PAD)
    nll = -torch.log_softmax(logits.float(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)[scored].sum()
    positions = sample["net_input"]["src_tokens"].ne(PAD).sum()
    assert extra["span_loss"] != 0 and sample_size == scored.sum()
    assert (scored.sum() < positions / 10) if labelled else (scored.sum() == positions)
    assert float(loss) == pytest.approx(float(nll + 0.5 * extra["span_loss"] * scored.sum() / positions))
    assert float(logging_output["nll_loss"]) == pytest.approx(float(nll))


def test_weights_of_another_dictionary_of_the_same_size_or_block_length_are_refused(data_bin, tmp_path):
    cfg = parsed_training_config(data_bin, "expire_span_lm_tiny")
    trained = tasks.setup_task(cfg.task).build_model(cfg.model)
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    lines = (data_bin / "dict.txt").read_text().splitlines()
    (shuffled / "dict.txt").write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same size, other ids
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx"):
        (shuffled / name).write_bytes((data_bin / name).read_bytes())
    other_cfg = parsed_training_config(shuffled, "expire_span_lm_tiny")
    other = tasks.setup_task(other_cfg.task).build_model(other_cfg.model)
    with pytest.raises(UsageError, match="trained with a different dictionary.*--srcdict"):
        other.load_state_dict(trained.state_dict())
    longer_cfg = parsed_training_config(data_bin, "expire_span_lm_tiny", "--tokens-per-sample", "8")
    longer = tasks.setup_task(longer_cfg.task).build_model(longer_cfg.model)
    with pytest.raises(UsageError, match="--tokens-per-sample 8, but .* trained with --tokens-per-sample 16"):
        longer.load_state_dict(trained.state_dict())
    older = {k: v for k, v in trained.state_dict().items() if k != "decoder.dictionary_fingerprint"}
    other.load_state_dict(older)  # a checkpoint from before the fingerprint cannot be checked, and loads


def test_a_model_without_memory_is_refused(data_bin):
    small = ["--decoder-layers", "1", "--decoder-embed-dim", "8", "--decoder-hidden-size", "8"]
    cfg = parsed_training_config(data_bin, "lstm_lm", *small, "--decoder-out-embed-dim", "8")
    with pytest.raises(ValueError, match="needs a model that carries memory.*not --arch lstm_lm"):
        tasks.setup_task(cfg.task).build_model(cfg.model)


def test_eval_lm_refuses_a_context_window(data_bin):
    task = loaded_task(data_bin, "valid")
    with pytest.raises(ValueError, match="--context-window does not apply.*carries its memory"):
        task.eval_lm_dataloader(task.dataset("valid"), batch_size=2, context_window=8)
    batches = list(task.eval_lm_dataloader(task.dataset("valid"), batch_size=2))
    assert sum(batch["ntokens"] for batch in batches) == len(task.dataset("valid")) - 2
