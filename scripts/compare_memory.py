#!/usr/bin/env python3
"""A small analog of the paper's Figure 7 on the demo corpus: bits per byte against the memory each model keeps,
for expire_span_lm, fixed_span_lm (Transformer-XL), adaptive_span_lm and compressive_lm at a few memory sizes L,
every run trained the same way (same model size, data, updates, optimizer, seed) with the real fairseq-train and
scored on the test split with the real fairseq-eval-lm.

    python scripts/compare_memory.py --sizes 128 512 --updates 600 --json compare/figure7.json

L is the maximum span (expire-span, Adaptive-Span), the span (Transformer-XL), or the reach n_mem + c * n_cmem of
the compressive memory (n_mem = one block, c = 4). Memory is what validation measured: entries kept per layer and
stream (mem_avg) and keys attended per query (|C_t|, attn_mem_avg).
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

from demo import BIN, LICENSES, REPO, corpus_files, last_record, run

BLOCK = 64
MODELS = ("expire_span_lm", "fixed_span_lm", "adaptive_span_lm", "compressive_lm")


def memory_options(model: str, size: int) -> list:
    """Each model's own options for memory size L (ramps and span-loss coefficients as in their papers)."""
    if model == "expire_span_lm":
        return ["--max-span", size, "--expire-span-ramp", 32, "--expire-span-alpha", 1e-6]
    if model == "adaptive_span_lm":
        return ["--max-span", size, "--adaptive-span-ramp", 32, "--adaptive-span-loss", 5e-7]
    if model == "compressive_lm":
        return ["--mem-size", BLOCK, "--cmem-size", (size - BLOCK) // 4, "--compression-rate", 4]
    return ["--max-span", size]


def train_and_evaluate(model: str, size: int, data: Path, save_dir: Path, updates: int) -> dict:
    started = time.time()
    # fmt: off
    train = run(
        BIN / "fairseq-train", data, "--user-dir", "fairseq_expire",
        "--task", "language_modeling_with_memory", "--criterion", "expire_span_cross_entropy",
        "--arch", f"{model}_tiny", "--decoder-layers", 2, "--decoder-embed-dim", 64,
        "--decoder-ffn-embed-dim", 256, "--decoder-attention-heads", 4, *memory_options(model, size),
        "--tokens-per-sample", BLOCK, "--batch-size", 8,
        "--optimizer", "adam", "--lr", 2e-3, "--clip-norm", 0.3,
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", 100,
        "--max-update", updates, "--validate-interval-updates", updates, "--save-interval-updates", updates,
        "--no-epoch-checkpoints", "--cpu", "--num-workers", 0, "--seed", 1,
        "--log-format", "json", "--log-interval", 100, "--no-progress-bar", "--save-dir", save_dir,
    )
    trained = time.time() - started
    evaluation = run(
        BIN / "fairseq-eval-lm", data, "--user-dir", "fairseq_expire",
        "--task", "language_modeling_with_memory", "--path", save_dir / "checkpoint_last.pt",
        "--gen-subset", "test", "--tokens-per-sample", BLOCK, "--batch-size", 1, "--cpu",
    )
    # fmt: on
    valid = last_record(train, "valid")
    return {
        "model": model,
        "L": size,
        "test_bits_per_byte": float(re.search(r"Loss \(base 2\): ([\d.]+)", evaluation).group(1)),
        "valid_bits_per_byte": float(valid["valid_nll_loss"]),
        "memory_kept": float(valid["valid_mem_avg"]),
        "attended": float(valid["valid_attn_mem_avg"]),
        "train_seconds": round(trained),
    }


def markdown(rows) -> str:
    lines = [
        "| model | L | test bits/byte | valid bits/byte | memory kept/layer | keys attended/query | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['L']} | {r['test_bits_per_byte']:.3f} | {r['valid_bits_per_byte']:.3f} "
            f"| {r['memory_kept']:.0f} | {r['attended']:.0f} | {r['train_seconds']} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=REPO / "compare", help="where data and checkpoints go")
    parser.add_argument("--corpus", type=Path, default=LICENSES, help="a directory of plain text files")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[128, 512], help="memory sizes L (> one block)"
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--updates", type=int, default=600, help="training updates of every run")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if min(args.sizes) <= BLOCK or any((size - BLOCK) % 4 for size in args.sizes):
        sys.exit(f"error: --sizes must exceed the block ({BLOCK}) by a multiple of 4 (the compression rate)")

    data = args.work / "data-bin"
    if not (data / "dict.txt").exists():
        # fmt: off
        run(sys.executable, REPO / "scripts" / "prepare_text.py", "--input", *corpus_files(args.corpus),
            "--tokenizer", "bytes", "--newlines", "eos", "--out", data)
        # fmt: on
    rows = []
    for size in args.sizes:
        for model in args.models:
            save_dir = args.work / "checkpoints" / f"{model}_L{size}"
            for old in save_dir.glob("checkpoint*.pt"):  # fairseq-train would resume from them
                old.unlink()
            rows.append(train_and_evaluate(model, size, data, save_dir, args.updates))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
