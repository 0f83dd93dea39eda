"""Running the real fairseq console scripts from tests, and tiny data directories for them."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("PYTHONPATH", None)


def run(
    script: str, *args, check: bool = True, timeout: int = 600, input: str = None
) -> subprocess.CompletedProcess:
    """``script`` (fairseq-train, fairseq-eval-lm, fairseq-preprocess...) from the installed environment, with
    ``input`` on its standard input."""
    command = [str(BIN / script), *map(str, args)]
    options = dict(cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout, input=input)
    result = subprocess.run(command, **options)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def eval_lm(data, checkpoint, *args, check: bool = True) -> subprocess.CompletedProcess:
    """The real fairseq-eval-lm with this plugin's task: ``checkpoint`` scores the valid split on the CPU."""
    return run(
        "fairseq-eval-lm", data, "--user-dir", "fairseq_expire", "--task", "language_modeling_with_memory",
        "--path", checkpoint, "--gen-subset", "valid", "--cpu", *args, check=check,
    )  # fmt: skip


def eval_lm_bits(output: str) -> float:
    """The mean loss in bits per token that fairseq-eval-lm prints."""
    return float(re.search(r"Loss \(base 2\): ([\d.]+)", output).group(1))


def json_logs(output: str, tag: str) -> list:
    """The ``--log-format json`` records of one kind (train_inner, train, valid) from fairseq's output."""
    records = []
    for line in output.splitlines():
        if f"| {tag} | {{" in line:
            records.append(json.loads(line.split(f"| {tag} | ", 1)[1]))
    return records


def repeating_text(length: int, period: int, repeats: int = 4, seed: int = 0) -> str:
    """Fresh random letters, each ``period``-long unit said ``repeats`` times: after its first time, a unit is
    predictable only with memory of ``period`` steps (and its first time is unpredictable: 4 bits a letter).
    """
    rng = random.Random(seed)
    text = ""
    while len(text) < length:
        text += "".join(rng.choice("abcdefghijklmnop") for _ in range(period)) * repeats
    return text[:length]


def random_letters_data_bin(directory: Path) -> Path:
    """Random letters (no repeats, so every stream has its own loss): ~3000 train and ~800 valid tokens."""
    rng = random.Random(0)
    text = "".join(rng.choice("abcdefghijklmnop") for _ in range(3800))
    return make_data_bin(directory, text[:3000], text[3000:], line_length=97)


def make_data_bin(directory: Path, train: str, valid: str, line_length: int = 100) -> Path:
    """Character-level fairseq data (one token per character) made with the real fairseq-preprocess."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid)):
        lines = [" ".join(text[i : i + line_length]) for i in range(0, len(text), line_length)]
        (directory / f"{split}.txt").write_text("\n".join(lines) + "\n")
    run(
        "fairseq-preprocess",
        "--only-source",
        "--trainpref",
        directory / "train.txt",
        "--validpref",
        directory / "valid.txt",
        "--destdir",
        directory / "bin",
        "--workers",
        1,
    )
    return directory / "bin"


def train_command(data, save_dir, *extra, arch="expire_span_lm_tiny", updates=20, block=16, batch=4):
    return [
        data,
        "--user-dir",
        "fairseq_expire",
        "--task",
        "language_modeling_with_memory",
        "--arch",
        arch,
        "--criterion",
        "expire_span_cross_entropy",
        "--tokens-per-sample",
        block,
        "--batch-size",
        batch,
        "--optimizer",
        "adam",
        "--lr",
        "0.003",
        "--max-update",
        updates,
        "--cpu",
        "--seed",
        1,
        "--no-progress-bar",
        "--log-format",
        "json",
        "--log-interval",
        5,
        "--save-dir",
        save_dir,
        "--num-workers",
        0,
        *extra,
    ]
