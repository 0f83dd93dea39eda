"""Synthetic data as fairseq reads it: format, determinism, sizes, and clear errors from the command line.

The per-task checkers (tests/test_synthetic_<task>.py) use :func:`generate` and :func:`read_split` from here.
"""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from console import ENV, REPO, run
from fairseq.data import Dictionary, indexed_dataset

from fairseq_expire.synthetic import GENERATORS, generate_dataset
from fairseq_expire.synthetic.cli import main

SMALL = {  # options that make every task's units short, for small splits
    "copy": {"min_gap": 5, "max_gap": 40},
    "collision": {"grid_size": 8},  # more frequent collisions
    "collision_easy": {"grid_size": 8},
    "corridor": {"min_length": 3, "max_length": 30},
    "portal": {"rooms": 8},
    "instruction": {"characters": 4, "mean_delay": 40},
}


def generate(tmp_path, task, options=None, sizes=(20000, 5000, 5000), seed=1, raw_text=True, name=None):
    """A data-bin directory of ``task`` made by the library (the same path as the command line)."""
    generator = GENERATORS[task]
    out = tmp_path / (name or task)
    config = generator.config_class(**{**SMALL[task], **(options or {})})
    generate_dataset(generator(config), out, dict(zip(("train", "valid", "test"), sizes)), seed, raw_text)
    return out


def read_split(directory, split):
    """The tokens and labels of a split as symbols, decoded from the binaries with dict.txt."""
    dictionary = Dictionary.load(str(directory / "dict.txt"))
    streams = []
    for prefix in (split, f"{split}.labels"):
        data = indexed_dataset.MMapIndexedDataset(str(directory / prefix))
        ids = np.concatenate([data[i].numpy() for i in range(len(data))])
        streams.append([dictionary[i] for i in ids])
    return streams


def test_binaries_are_the_raw_text_and_labels_line_up(tmp_path):
    out = generate(tmp_path, "instruction")
    dictionary = Dictionary.load(str(out / "dict.txt"))
    assert "_" in dictionary.symbols and dictionary.unk_word not in dictionary.symbols[dictionary.nspecial :]
    metadata = json.loads((out / "prepare.json").read_text())
    for split in ("train", "valid", "test"):
        tokens, labels = read_split(out, split)
        text = (out / "raw" / f"{split}.txt").read_text().split("\n")[:-1]
        label_text = (out / "raw" / f"{split}.labels.txt").read_text().split("\n")[:-1]
        assert tokens == " ".join(text).split() and labels == " ".join(label_text).split()
        assert [len(line.split()) for line in text] == [len(line.split()) for line in label_text]
        assert dictionary.unk() not in [dictionary.index(t) for t in tokens + labels]
        binaries = [indexed_dataset.MMapIndexedDataset(str(out / p)) for p in (split, f"{split}.labels")]
        assert (binaries[0].sizes == binaries[1].sizes).all()  # the task reads tokens and labels item by item
        scored = sum(label != "_" for label in labels)
        assert metadata["splits"][split] == {"tokens": len(tokens), "lines": len(text), "scored": scored}


@pytest.mark.slow
def test_fairseq_preprocess_of_the_raw_text_gives_the_same_ids(tmp_path):
    """The binaries hold what fairseq-preprocess makes of the raw text with dict.txt, minus its per-line </s>."""
    out = generate(tmp_path, "portal", sizes=(4000, 2000, 2000))
    dictionary = Dictionary.load(str(out / "dict.txt"))
    for prefix in ("valid", "valid.labels"):
        destdir = tmp_path / f"preprocessed_{prefix}"
        raw = out / "raw" / f"{prefix}.txt"
        run(
            "fairseq-preprocess",
            "--only-source",
            "--srcdict",
            out / "dict.txt",
            "--validpref",
            raw,
            "--destdir",
            destdir,
        )
        theirs = indexed_dataset.MMapIndexedDataset(str(destdir / "valid"))
        ours = indexed_dataset.MMapIndexedDataset(str(out / prefix))
        assert ours._index.dtype == theirs._index.dtype  # the same bytes per token
        lines = np.concatenate([theirs[i].numpy()[:-1] for i in range(len(theirs))])
        assert all(theirs[i][-1] == dictionary.eos() for i in range(len(theirs)))
        assert (lines == np.concatenate([ours[i].numpy() for i in range(len(ours))])).all()


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_same_seed_same_bytes_other_seed_other_data(tmp_path, task):
    first, again, other = (
        generate(tmp_path, task, seed=seed, name=name) for seed, name in ((3, "a"), (3, "b"), (4, "c"))
    )
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    assert {"dict.txt", "train.bin", "train.labels.idx", "raw/test.labels.txt"} <= {str(f) for f in files}
    assert files == sorted(path.relative_to(again) for path in again.rglob("*") if path.is_file())
    made_when = {"prepare.json", "README.md"}  # the record of the run: its time and duration
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files if str(f) not in made_when)
    assert (first / "dict.txt").read_text().split()[::2] == (other / "dict.txt").read_text().split()[::2]
    for split in ("train", "valid", "test"):
        assert (first / f"{split}.bin").read_bytes() != (other / f"{split}.bin").read_bytes()


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_splits_are_as_large_as_asked(tmp_path, task):
    sizes = (30000, 7000, 6000)
    task_object = GENERATORS[task](GENERATORS[task].config_class(**SMALL[task]))
    out = generate(tmp_path, task, sizes=sizes, raw_text=False)
    assert not (out / "raw").exists()
    for split, size in zip(("train", "valid", "test"), sizes):
        tokens, labels = read_split(out, split)
        assert size - task_object.min_split_tokens() < len(tokens) <= size
        assert len(labels) == len(tokens)


def test_a_few_hundred_thousand_corridor_tokens_take_a_moment(tmp_path):
    started = time.perf_counter()
    out = generate(tmp_path, "corridor", {"min_length": 3, "max_length": 200}, sizes=(300000, 30000, 30000))
    assert time.perf_counter() - started < 10
    assert json.loads((out / "prepare.json").read_text())["splits"]["train"]["tokens"] > 299000


def cli_error(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_requests_stop_with_a_clear_message_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "data"
    assert "invalid choice: 'kopy'" in cli_error(capsys, "kopy", "--out", out)
    assert "at least one token" in cli_error(capsys, "corridor", "--out", out, "--valid-tokens", 0)
    assert "not a whole number" in cli_error(capsys, "corridor", "--out", out, "--train-tokens", "lots")
    error = cli_error(capsys, "copy", "--out", out, "--max-gap", 5000, "--valid-tokens", 3000)
    assert "--valid-tokens 3000 cannot hold one whole copy unit" in error and "5034" in error
    assert "--min-gap <= --max-gap" in cli_error(capsys, "copy", "--out", out, "--min-gap", 9, "--max-gap", 8)
    assert "--mean-delay 10 is too short" in cli_error(
        capsys, "instruction", "--out", out, "--mean-delay", 10
    )
    assert "--colours must be between 2 and 8" in cli_error(capsys, "collision", "--out", out, "--colours", 1)
    assert "--speed must be positive" in cli_error(capsys, "collision_easy", "--out", out, "--speed", "nan")
    error = cli_error(capsys, "collision", "--out", out, "--train-tokens", 90, "--valid-tokens", 90)
    assert "has no scored answer" in error and "--train-tokens" in error
    assert list(tmp_path.iterdir()) == []  # no dataset, no partial directory left behind

    existing = generate(tmp_path, "corridor")
    before = {p: p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    error = cli_error(capsys, "corridor", "--out", existing)
    assert f"{existing} holds data prepared with other options (max_length: 30 there, 200 now" in error
    assert "pass --force to replace it" in error
    # all refuses before writing any task
    assert f"{existing} holds data prepared with other options" in cli_error(capsys, "all", "--out", tmp_path)
    assert before == {p: p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    assert [p.name for p in tmp_path.iterdir()] == ["corridor"]


def test_the_same_request_again_does_nothing_and_force_replaces_other_options(tmp_path, capsys):
    out = generate(tmp_path, "corridor")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    generate(tmp_path, "corridor")
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    sizes = ["--train-tokens", 20000, "--valid-tokens", 5000, "--test-tokens", 5000]
    main([str(a) for a in ["corridor", "--out", out, "--max-length", 20, *sizes, "--force"]])
    record = json.loads((out / "prepare.json").read_text())
    assert record["dataset"] == "corridor" and record["recipe"]["max_length"] == 20
    assert record["ignore_label"] == "_" and list(tmp_path.iterdir()) == [out]


@pytest.mark.slow
def test_the_script_generates_every_task_and_refuses_to_overwrite_other_options(tmp_path):
    script = [sys.executable, str(REPO / "scripts" / "generate_synthetic.py")]
    sizes = ["--train-tokens", "60000", "--valid-tokens", "20000", "--test-tokens", "20000"]
    result = subprocess.run(
        [*script, "all", "--out", str(tmp_path), *sizes], cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(GENERATORS)
    assert all((tmp_path / task / "valid.labels.bin").stat().st_size > 0 for task in GENERATORS)
    again = subprocess.run(
        [*script, "corridor", "--out", str(tmp_path / "corridor")], env=ENV, capture_output=True, text=True
    )
    assert again.returncode == 2 and "other options" in again.stderr and "Traceback" not in again.stderr
