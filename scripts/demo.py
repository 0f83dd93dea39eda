#!/usr/bin/env python3
"""`make demo`: the whole job on a fresh machine, on CPU, in a few minutes, with no network.

1. prepares a byte-level corpus from the licence texts every Debian machine has (/usr/share/common-licenses,
   about 250 KB; GPL-2/GPL-3, LGPL-2/2.1 repeat each other, which memory can exploit) with
   ``scripts/prepare_text.py``;
2. trains a small ``expire_span_lm`` with the real ``fairseq-train``;
3. scores the test split with the real ``fairseq-eval-lm``, carrying memory across blocks;
4. prints bits per byte and how much memory the model chose to keep.

Everything goes under ``--work`` (default ``demo/``). A second run reuses the prepared data and trains again
from scratch.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LICENSES = Path("/usr/share/common-licenses")
BLOCK = 64


def corpus_files(directory: Path):
    """The licence texts, each once (the directory also holds symlinks to them)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.is_symlink())
    if not files:
        sys.exit(f"error: no text files in {directory}; pass --corpus DIR with some plain text files")
    return files


def run(*command, **kwargs) -> str:
    print("$", " ".join(map(str, command)), flush=True)
    result = subprocess.run(list(map(str, command)), cwd=REPO, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        sys.exit(
            f"error: {command[0]} failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result.stdout + result.stderr


def last_record(output: str, tag: str) -> dict:
    records = [line.split(f"| {tag} | ", 1)[1] for line in output.splitlines() if f"| {tag} | {{" in line]
    if not records:
        sys.exit(f"error: fairseq-train logged no {tag} record")
    return json.loads(records[-1])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=REPO / "demo", help="where data and checkpoints go")
    parser.add_argument("--corpus", type=Path, default=LICENSES, help="a directory of plain text files")
    parser.add_argument(
        "--updates", type=int, default=3000, help="training updates (about 3 minutes on 2 cores)"
    )
    args = parser.parse_args()

    data, checkpoints = args.work / "data-bin", args.work / "checkpoints"
    shutil.rmtree(
        checkpoints, ignore_errors=True
    )  # fairseq-train would resume from the last run's checkpoint
    # fmt: off
    run(sys.executable, REPO / "scripts" / "prepare_text.py", "--input", *corpus_files(args.corpus),
        "--tokenizer", "bytes", "--newlines", "eos", "--out", data)

    started = time.time()
    train = run(
        BIN / "fairseq-train", data, "--user-dir", "fairseq_expire",
        "--task", "language_modeling_with_memory", "--criterion", "expire_span_cross_entropy",
        "--arch", "expire_span_lm_tiny", "--decoder-layers", 3, "--decoder-embed-dim", 64,
        "--decoder-ffn-embed-dim", 256, "--decoder-attention-heads", 4,
        "--max-span", 2048, "--expire-span-ramp", 32, "--expire-span-alpha", 1e-6,
        "--tokens-per-sample", BLOCK, "--batch-size", 8,
        "--optimizer", "adam", "--lr", 2e-3, "--clip-norm", 0.3,
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", 100,
        "--max-update", args.updates, "--validate-interval-updates", 1000, "--save-interval-updates", 1000,
        "--keep-interval-updates", 1, "--no-epoch-checkpoints",
        "--cpu", "--num-workers", 0, "--seed", 1,
        "--log-format", "json", "--log-interval", 100, "--no-progress-bar",
        "--save-dir", checkpoints,
    )
    trained = time.time() - started
    evaluation = run(
        BIN / "fairseq-eval-lm", data, "--user-dir", "fairseq_expire",
        "--task", "language_modeling_with_memory", "--path", checkpoints / "checkpoint_best.pt",
        "--gen-subset", "test", "--tokens-per-sample", BLOCK, "--batch-size", 1, "--cpu",
    )
    # fmt: on
    valid = last_record(train, "valid")
    test_bpb = float(re.search(r"Loss \(base 2\): ([\d.]+)", evaluation).group(1))
    print()
    print(f"trained {args.updates} updates in {trained:.0f} s")
    print(f"valid: {valid['valid_nll_loss']} bits/byte, mean span {valid['valid_span_avg']} of L = 2048, ")
    print(
        f"       memories kept per layer and stream {valid['valid_mem_avg']}, keys attended per query {valid['valid_attn_mem_avg']}"
    )
    print(f"test (fairseq-eval-lm, memory carried across blocks): {test_bpb:.3f} bits/byte")
    print(f"checkpoint: {checkpoints / 'checkpoint_best.pt'}")


if __name__ == "__main__":
    main()
