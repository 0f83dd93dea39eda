"""language_modeling_with_memory through the real fairseq-train, fairseq-eval-lm and torchrun."""

import math
import random
import re
import socket
from collections import defaultdict

import pytest
import torch
from console import (
    eval_lm,
    eval_lm_bits,
    json_logs,
    make_data_bin,
    random_letters_data_bin,
    run,
    train_command,
)
from fairseq import checkpoint_utils
from fairseq.data import Dictionary, indexed_dataset

import fairseq_expire  # noqa: F401  (registers the model and criterion)
from fairseq_expire.tasks import language_modeling_with_memory  # noqa: F401  (registers the task)

pytestmark = pytest.mark.slow

BLOCK = 16


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    return random_letters_data_bin(tmp_path_factory.mktemp("task_cli"))


@pytest.fixture(scope="module")
def checkpoint(data_bin, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("checkpoint")
    run("fairseq-train", *train_command(data_bin, save_dir, updates=10, block=BLOCK, batch=4))
    return save_dir / "checkpoint_last.pt"


def eval_lm_blocks(data, checkpoint, *extra, check=True):
    return eval_lm(data, checkpoint, "--tokens-per-sample", BLOCK, *extra, check=check)


def split_tokens(data, split) -> torch.Tensor:
    lines = indexed_dataset.MMapIndexedDataset(str(data / split))
    return torch.cat([lines[i] for i in range(len(lines))]).long()


def direct_loss(checkpoint, data, streams: int):
    """Base-2 NLL of the model over ``streams`` equal streams of the valid split, one stream at a time, fed
    block by block from an empty memory: what eval-lm must report. Returns (loss, tokens scored)."""
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)], {"data": str(data)})
    model, pad = models[0].eval(), task.dictionary.pad()
    nll, count = 0.0, 0
    with torch.no_grad():
        for stream in torch.tensor_split(split_tokens(data, "valid"), streams):
            for k, start in enumerate(range(0, len(stream) - 1, BLOCK)):
                tokens = stream[start : start + BLOCK + 1]
                inputs = torch.full((1, BLOCK), pad)
                inputs[0, : min(BLOCK, len(tokens))] = tokens[:BLOCK]
                logits, _ = model(inputs, reset_memory=k == 0)
                lprobs = model.get_normalized_probs((logits, None), log_probs=True)[0, : len(tokens) - 1]
                nll -= float(lprobs.gather(1, tokens[1:, None]).sum())
                count += len(tokens) - 1
    return nll / count / math.log(2), count


def test_eval_lm_scores_every_token_but_each_streams_first_as_the_model_does(data_bin, checkpoint):
    streams = 3
    result = eval_lm_blocks(data_bin, checkpoint, "--batch-size", streams, "--output-word-probs")
    output = result.stdout + result.stderr
    tokens = split_tokens(data_bin, "valid")
    evaluated = int(re.search(r"Evaluated ([\d,]+) tokens", output).group(1).replace(",", ""))
    loss = eval_lm_bits(output)
    assert evaluated == len(tokens) - streams

    expected_loss, count = direct_loss(checkpoint, data_bin, streams)
    assert count == evaluated
    assert loss == pytest.approx(expected_loss, abs=2e-4)

    # --output-word-probs: each stream's scored tokens, in order, are the stream without its first token
    printed = defaultdict(list)
    for line in output.splitlines():
        match = re.match(r".*\| fairseq_cli\.eval_lm \| (\d+) (.*\[-?[\d.]+\].*)$", line)
        if match:
            printed[int(match.group(1))] += [word.rsplit(" [", 1)[0] for word in match.group(2).split("\t")]
    dictionary = Dictionary.load(str(data_bin / "dict.txt"))
    for stream, expected in enumerate(torch.tensor_split(tokens, streams)):
        assert printed[stream] == [dictionary[int(token)] for token in expected[1:]]


def test_eval_lm_refuses_a_context_window_and_another_dictionary(data_bin, checkpoint, tmp_path):
    result = eval_lm_blocks(data_bin, checkpoint, "--batch-size", 2, "--context-window", 8, check=False)
    assert result.returncode != 0
    assert "--context-window does not apply" in result.stderr.strip().splitlines()[-1]

    other = make_data_bin(tmp_path / "other", "qrstuvwxyz" * 300, "qrstuvwxyz" * 80)
    result = eval_lm_blocks(other, checkpoint, "--batch-size", 2, check=False)
    assert result.returncode != 0
    assert "trained with a different dictionary" in result.stderr.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_split_the_streams_and_train_as_one_process_with_all_of_them(data_bin, tmp_path):
    """2 ranks x 2 streams = 1 rank x 4 streams: same streams, same gradients, same losses, if and only if each
    rank trains and validates on its own half of the streams."""
    single = run(
        "fairseq-train", *train_command(data_bin, tmp_path / "one", updates=10, block=BLOCK, batch=4)
    )
    distributed = run(
        "torchrun",
        "--nproc_per_node",
        2,
        "--master_port",
        free_port(),
        "-m",
        "fairseq_cli.train",
        *train_command(data_bin, tmp_path / "two", updates=10, block=BLOCK, batch=2),
        "--distributed-backend",
        "gloo",
        "--ddp-backend",
        "legacy_ddp",
    )
    logs = {name: result.stdout + result.stderr for name, result in (("one", single), ("two", distributed))}
    inner = {name: json_logs(log, "train_inner") for name, log in logs.items()}
    assert [record["bsz"] for record in inner["two"]] == ["4", "4"]  # both ranks contribute their 2 streams
    assert "2 on this rank" in logs["two"]
    for one, two in zip(inner["one"], inner["two"]):
        assert set(two) == set(one)  # spans, memory sizes, |C_t| and losses, gathered from both ranks
        for key in ("loss", "nll_loss", "span_avg", "span_max", "mem_avg", "attn_mem_avg"):
            assert float(two[key]) == pytest.approx(float(one[key]), abs=2e-3), key
    valid = {name: json_logs(log, "valid")[-1] for name, log in logs.items()}
    assert float(valid["two"]["valid_nll_loss"]) == pytest.approx(
        float(valid["one"]["valid_nll_loss"]), abs=2e-3
    )


def iterator_state(save_dir):
    state = torch.load(save_dir / "checkpoint_last.pt", weights_only=False)
    return state["extra_state"]["train_iterator"]


def test_mid_epoch_resume_continues_with_the_next_block_of_the_same_streams(data_bin, tmp_path):
    batches_per_epoch = math.ceil((len(split_tokens(data_bin, "train")) / 4 - 1) / BLOCK)
    total = batches_per_epoch + 3  # ends early in epoch 2
    run("fairseq-train", *train_command(data_bin, tmp_path / "straight", updates=total, block=BLOCK, batch=4))

    interrupted = tmp_path / "interrupted"
    run("fairseq-train", *train_command(data_bin, interrupted, updates=7, block=BLOCK, batch=4))
    assert iterator_state(interrupted)["iterations_in_epoch"] == 7

    refused = run(
        "fairseq-train",
        *train_command(data_bin, interrupted, updates=total, block=BLOCK, batch=3),
        check=False,
    )
    assert refused.returncode != 0
    reason = refused.stderr.strip().splitlines()[-1]
    assert "cannot resume mid-epoch" in reason and "--batch-size: 4 in the checkpoint, 3 now" in reason

    resumed = run("fairseq-train", *train_command(data_bin, interrupted, updates=total, block=BLOCK, batch=4))
    log = resumed.stdout + resumed.stderr
    assert f"resuming epoch 1 at batch 8 of {batches_per_epoch}" in log and "memory" in log
    assert iterator_state(interrupted) == iterator_state(tmp_path / "straight")
    assert (
        iterator_state(interrupted)["epoch"] == 2 and iterator_state(interrupted)["iterations_in_epoch"] == 3
    )


def test_validation_leaves_the_training_memory_alone(data_bin, tmp_path):
    """Validating every 4 updates (cold evaluation memory each time) must not change a single training loss."""
    losses = {}
    for name, extra in (
        ("validating", ["--validate-interval-updates", 4]),
        ("not", ["--disable-validation"]),
    ):
        result = run(
            "fairseq-train",
            *train_command(data_bin, tmp_path / name, "--stream-offset", "--no-save", *extra, updates=20),
        )
        losses[name] = [record["loss"] for record in json_logs(result.stdout + result.stderr, "train_inner")]
        if name == "validating":
            assert len(json_logs(result.stdout + result.stderr, "valid")) >= 4
    assert losses["validating"] == losses["not"] and len(losses["not"]) == 4


def test_bad_training_input_stops_with_one_clear_line(data_bin, tmp_path):
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    for name in ("dict.txt", "train.bin", "train.idx"):
        (only_train / name).write_bytes((data_bin / name).read_bytes())
    cases = [
        (train_command(only_train, tmp_path / "a"), "split 'valid' not found"),
        (train_command(data_bin, tmp_path / "b", "--max-span", 4096, block=4096), "is larger than the split"),
        (train_command(data_bin, tmp_path / "c", batch=2000), "streams would be empty"),
    ]
    for command, reason in cases:
        result = run("fairseq-train", *command, check=False)
        assert result.returncode != 0
        assert reason in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]


def refusal(result) -> str:
    """The one line a refused command ends with (and the check that it ended so, not by a traceback or signal)."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-3000:]
    return last


def test_bad_options_and_data_stop_fairseq_train_with_one_line_before_the_model_is_built(data_bin, tmp_path):
    no_train = tmp_path / "no_train"  # a second shard that lacks the train split
    no_train.mkdir()
    (no_train / "dict.txt").write_bytes((data_bin / "dict.txt").read_bytes())
    cases = [
        (("--expire-span-ramp", 0), "--expire-span-ramp 0: must be an integer >= 1"),
        (("--expire-span-init-percentage", 1), "--expire-span-init-percentage 1.0: must be strictly between"),
        (("--tokens-per-sample", 10**8, "--max-span", 10**8), "larger than the split 'train'"),
        (("--batch-size-valid", 500), "streams would be empty"),
        (("--batch-size", -3), "--batch-size -3: must be an integer >= 1"),
    ]
    for extra, reason in cases:
        result = run("fairseq-train", *train_command(data_bin, tmp_path / "a", *extra), check=False)
        assert reason in refusal(result) and "model params" not in result.stderr
    result = run("fairseq-train", *train_command(f"{data_bin}:{no_train}", tmp_path / "b"), check=False)
    assert "split 'train' not found" in refusal(result) and "model params" not in result.stderr
    for command, reason in [
        (
            train_command(data_bin, tmp_path / "c", "--expire-span-alpha", -1),
            "--expire-span-alpha -1.0: must be",
        ),
        (train_command(data_bin, tmp_path / "d", arch="transformer_lm"), "reads the task option"),
    ]:
        assert reason in refusal(run("fairseq-train", *command, check=False))
    assert not any(path.suffix == ".pt" for path in tmp_path.rglob("*"))


def shuffled_dictionary_copy(data_bin, directory):
    """The same data under a dictionary of the same size whose ids mean other symbols."""
    directory.mkdir()
    symbols = (data_bin / "dict.txt").read_text().splitlines()
    (directory / "dict.txt").write_text("\n".join(symbols[1:] + symbols[:1]) + "\n")
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx"):
        (directory / name).write_bytes((data_bin / name).read_bytes())
    return directory


def test_weights_never_go_onto_another_dictionary_or_block_length(data_bin, checkpoint, tmp_path):
    shuffled = shuffled_dictionary_copy(data_bin, tmp_path / "shuffled")
    resume_elsewhere = tmp_path / "resume_elsewhere"  # the checkpoint's run, resumed on the other data
    resume_elsewhere.mkdir()
    (resume_elsewhere / "checkpoint_last.pt").write_bytes(checkpoint.read_bytes())
    for save_dir, extra in [
        (resume_elsewhere, ("--reset-dataloader",)),
        (tmp_path / "finetune", ("--finetune-from-model", checkpoint)),
    ]:
        result = run("fairseq-train", *train_command(shuffled, save_dir, *extra, updates=12), check=False)
        assert "trained with a different dictionary" in refusal(result)
    assert "trained with a different dictionary" in refusal(
        eval_lm_blocks(shuffled, checkpoint, "--batch-size", 2, check=False)
    )

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint_last.pt").write_bytes(checkpoint.read_bytes())
    result = run("fairseq-train", *train_command(data_bin, resumed, block=8, updates=12), check=False)
    assert (
        "--tokens-per-sample 8, but the checkpoint's model was trained with --tokens-per-sample 16"
        in refusal(result)
    )


def test_eval_lm_refuses_another_block_length_and_unreadable_checkpoints_by_name(
    data_bin, checkpoint, tmp_path
):
    for _ in range(3):  # it used to abort (SIGABRT) in about one run of six
        result = eval_lm_blocks(
            data_bin, checkpoint, "--batch-size", 2, "--tokens-per-sample", 8, check=False
        )
        assert "use --tokens-per-sample 16" in refusal(result)
    empty, noise = tmp_path / "empty.pt", tmp_path / "noise.pt"
    empty.write_bytes(b"")
    noise.write_bytes(random.Random(0).randbytes(5000))
    for path in (empty, noise):
        assert f"{path} is not a readable checkpoint" in refusal(
            eval_lm_blocks(data_bin, path, "--batch-size", 2, check=False)
        )
