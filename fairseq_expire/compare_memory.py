"""A small analog of the paper's Figure 7 on the demo corpus: bits per byte against the memory each model keeps,
for expire_span_lm, fixed_span_lm (Transformer-XL), adaptive_span_lm and compressive_lm at a few memory sizes L,
every run trained the same way (same model size, data, updates, optimizer, seed) with the real fairseq-train and
scored on the test split with the real fairseq-eval-lm.

    python scripts/compare_memory.py --sizes 128 512 --updates 600 --json compare/figure7.json

L is the maximum span (expire-span, Adaptive-Span), the span (Transformer-XL), or the reach n_mem + c * n_cmem of
the compressive memory (n_mem = one block, c = 4). Memory is what validation measured: entries kept per layer and
stream (mem_avg) and keys attended per query (|C_t|, attn_mem_avg). Everything goes under ``--work``: data-bin/,
checkpoints/, logs/ and commands.sh, the record of the commands run.
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from fairseq_expire.cli import script_parser
from fairseq_expire.demo import BIN, LICENSES, PLUGIN, Record, corpus_files, train
from fairseq_expire.errors import UsageError

BLOCK = 64
MODELS = ("expire_span_lm", "fixed_span_lm", "adaptive_span_lm", "compressive_lm")
# Every model: 2 layers of 64, block 64, 8 streams, Adam 2e-3; only how memories are kept differs.
TRAINING = [
    *("--decoder-layers", 2, "--decoder-embed-dim", 64, "--decoder-ffn-embed-dim", 256),
    *("--decoder-attention-heads", 4, "--tokens-per-sample", BLOCK, "--batch-size", 8),
    *("--optimizer", "adam", "--lr", 2e-3, "--clip-norm", 0.3, "--lr-scheduler", "inverse_sqrt"),
    *("--warmup-updates", 100, "--no-epoch-checkpoints", "--cpu", "--num-workers", 0, "--seed", 1),
    *("--log-format", "json", "--no-progress-bar"),
]


def memory_options(model: str, size: int) -> list:
    """Each model's own options for memory size L (ramps and span-loss coefficients as in their papers)."""
    if model == "expire_span_lm":
        return ["--max-span", size, "--expire-span-ramp", 32, "--expire-span-alpha", 1e-6]
    if model == "adaptive_span_lm":
        return ["--max-span", size, "--adaptive-span-ramp", 32, "--adaptive-span-loss", 5e-7]
    if model == "compressive_lm":
        return ["--mem-size", BLOCK, "--cmem-size", (size - BLOCK) // 4, "--compression-rate", 4]
    return ["--max-span", size]


def test_bits_per_byte(record: Record, data: Path, checkpoint: Path, log: Path) -> float:
    """fairseq-eval-lm on the test split, memory carried across blocks; its log goes to ``log``."""
    words = record.add(
        [BIN / "fairseq-eval-lm", data, "--user-dir", PLUGIN, "--task", "language_modeling_with_memory",
         "--path", checkpoint, "--gen-subset", "test", "--tokens-per-sample", BLOCK, "--batch-size", 1, "--cpu"],
        f"score {checkpoint.parent.name} on test",
    )  # fmt: skip
    result = subprocess.run(words, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    found = re.search(r"Loss \(base 2\): ([\d.]+)", result.stdout + result.stderr)
    if result.returncode != 0 or found is None:
        sys.exit(f"error: fairseq-eval-lm failed for {checkpoint} ({result.returncode}); see {log}")
    return float(found.group(1))


def train_and_evaluate(record: Record, model: str, size: int, data: Path, work: Path, updates: int) -> dict:
    name = f"{model}_L{size}"
    command = [data, "--user-dir", PLUGIN, "--task", "language_modeling_with_memory",
               "--criterion", "expire_span_cross_entropy", "--arch", f"{model}_tiny", *TRAINING,
               *memory_options(model, size), "--validate-interval-updates", updates,
               "--save-interval-updates", updates]  # fmt: skip
    save_dir = work / "checkpoints" / name
    trained = train(record, name, command, updates, save_dir, work / "logs" / f"{name}.log")
    valid = trained["valid"]
    return {
        "model": model,
        "L": size,
        "test_bits_per_byte": test_bits_per_byte(
            record, data, save_dir / "checkpoint_last.pt", work / "logs" / f"{name}.eval.log"
        ),
        "valid_bits_per_byte": float(valid["valid_nll_loss"]),
        "mem_avg": float(valid["valid_mem_avg"]),
        "attn_mem_avg": float(valid["valid_attn_mem_avg"]),
        "train_seconds": round(trained["seconds"]),
    }


def markdown(rows) -> str:
    lines = [
        "| model | L | test bits/byte | valid bits/byte | memory kept/layer | keys attended/query | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['L']} | {r['test_bits_per_byte']:.3f} | {r['valid_bits_per_byte']:.3f} "
            f"| {r['mem_avg']:.0f} | {r['attn_mem_avg']:.0f} | {r['train_seconds']} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = script_parser("compare_memory.py", __doc__)
    parser.add_argument("--work", type=Path, default=Path("compare"), help="where data and checkpoints go")
    parser.add_argument("--corpus", type=Path, default=LICENSES, help="a directory of plain text files")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[128, 512], help="memory sizes L (> one block)"
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--updates", type=int, default=600, help="training updates of every run")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if min(args.sizes) <= BLOCK or any((size - BLOCK) % 4 for size in args.sizes):
        raise UsageError(f"--sizes must exceed the block ({BLOCK}) by a multiple of 4 (the compression rate)")
    if args.updates < 1:
        raise UsageError(f"--updates {args.updates}: must be an integer >= 1")
    files = corpus_files(args.corpus)
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    record, data = Record(args.work), args.work / "data-bin"

    from fairseq_expire.prepare import text
    from fairseq_expire.prepare.cli import main as prepare

    prepare_args = ["--input", *files, "--tokenizer", "bytes", "--newlines", "eos", "--out", data]
    record.add([Path(sys.executable), "scripts/prepare_text.py", *prepare_args], "prepare the corpus")
    prepare(
        text.prepare_text, text.TextConfig, "", [str(arg) for arg in prepare_args]
    )  # the same again: no-op
    rows = []
    for size in args.sizes:
        for model in args.models:
            rows.append(train_and_evaluate(record, model, size, data, args.work, args.updates))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print("\n" + markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
