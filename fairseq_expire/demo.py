"""`make demo`: the paper's point on one screen, on the CPU, in about five minutes, with no network.

1. prepares a byte-level corpus from the licence texts every Debian machine has (/usr/share/common-licenses, about
   250 KB; GPL-2/GPL-3, LGPL-2/2.1 repeat each other, which memory can exploit);
2. trains Expire-Span (``expire_span_lm``) with the real ``fairseq-train``, then its fixed-span baseline
   (``fixed_span_lm``) the same way, its span set to the memory the Expire-Span model chose to keep;
3. scores both on the test split, memory carried across blocks as ``fairseq-eval-lm`` does, and the Expire-Span
   model again with its spans capped (the bits-vs-memory curve);
4. prints a table (bits per byte, memory kept per layer, keys attended per query, training time) and what it
   means, and draws the span map of a test passage and the curve.

Everything goes under ``--work`` (default ``demo/``): data-bin/, checkpoints/ and logs/ (the full fairseq output),
and the record of the run: commands.sh, report.md and figures/. A second run reuses the prepared data and trains
again from scratch.
"""

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from fairseq_expire.cli import script_parser
from fairseq_expire.errors import UsageError

LICENSES = Path("/usr/share/common-licenses")
BLOCK = 64
MAX_SPAN = 2048
CAPS = [16, 32, 64, 128, 256]
PASSAGE = (2000, 110)  # offset and length (bytes) of the test passage whose spans are drawn (legible)
SAMPLE = dict(prompt="The Licensee", max_tokens=200, sampling_topp=0.9, temperature=0.8, seed=1)  # the ending
PLUGIN = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
# Both models: 3 layers of 64, block 64, 8 streams, Adam 2e-3; only how memories are kept differs.
TRAINING = [
    *("--decoder-layers", 3, "--decoder-embed-dim", 64, "--decoder-ffn-embed-dim", 256),
    *("--decoder-attention-heads", 4, "--tokens-per-sample", BLOCK, "--batch-size", 8),
    *("--optimizer", "adam", "--lr", 2e-3, "--clip-norm", 0.3, "--lr-scheduler", "inverse_sqrt"),
    *("--warmup-updates", 100, "--no-epoch-checkpoints", "--cpu", "--num-workers", 0, "--seed", 1),
    *("--log-format", "json", "--no-progress-bar"),
]
EXPIRE_SPAN = ["--max-span", MAX_SPAN, "--expire-span-ramp", 32, "--expire-span-alpha", 1e-6]


def corpus_files(directory: Path) -> List[Path]:
    """The licence texts, each once (the directory also holds symlinks to them)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.is_symlink())
    if not files:
        raise UsageError(f"no text files in {directory}: pass --corpus DIR with some plain text files")
    return files


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it: the record reads as typed there."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


class Record:
    """The commands of the run, written to ``commands.sh`` as they run, so that each step can be redone."""

    def __init__(self, work: Path):
        self.path = work / "commands.sh"
        self.path.write_text("#!/bin/sh\n# the commands of the last `make demo` run, in order\nset -e\n")

    def add(self, command, note: Optional[str] = None) -> List[str]:
        words = [shown(w) if isinstance(w, Path) else str(w) for w in command]
        with open(self.path, "a") as handle:
            handle.write((f"# {note}\n" if note else "") + shlex.join(words) + "\n")
        return words


def train(record: Record, name: str, command: list, updates: int, save_dir: Path, log: Path) -> dict:
    """Run fairseq-train, printing a progress line about ten times; the last validation record and the time."""
    shutil.rmtree(save_dir, ignore_errors=True)  # fairseq-train would resume from the last run's checkpoint
    interval = max(1, updates // 10)
    words = record.add(
        [
            BIN / "fairseq-train",
            *command,
            "--max-update",
            updates,
            "--log-interval",
            interval,
            "--save-dir",
            save_dir,
        ],
        f"train {name}",
    )
    started, valid, first = time.time(), None, None
    with open(log, "w") as output, subprocess.Popen(
        words, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            output.write(line)
            for tag in ("train_inner", "valid"):
                if f"| {tag} | {{" in line:
                    values = json.loads(line.split(f"| {tag} | ", 1)[1])
                    if tag == "valid":
                        valid = values
                        continue
                    done, now = int(values["num_updates"]), time.time()
                    first = first or (done, now)  # the rate is measured from here: start-up is not training
                    left = (now - first[1]) / max(done - first[0], 1) * (updates - done)
                    print(
                        f"  {name:<14} update {done:>5}/{updates}  {float(values['nll_loss']):.2f} bits/byte  "
                        f"memory {float(values['mem_avg']):5.0f}  {now - started:4.0f} s"
                        + (f", about {left:.0f} s left" if done > first[0] else ""),
                        flush=True,
                    )
    if process.returncode != 0 or valid is None:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        sys.exit(f"error: fairseq-train failed for {name} ({process.returncode}); the end of {log}:\n{tail}")
    return {"valid": valid, "seconds": time.time() - started}


def evaluate(record: Record, checkpoint: Path, caps: List[int], out: Path, title: str = ""):
    """The test split with each span cap and none, as scripts/memory_curve.py does; the results, no cap last."""
    from fairseq_expire.analysis.curve import evaluate_caps, plot_curve, write_tables

    caps_words = [str(cap) for cap in caps] or ["none"]
    record.add(
        [Path(sys.executable), "scripts/memory_curve.py", "--checkpoint", checkpoint, "--split", "test",
         "--caps", *caps_words, "--out", out, "--cpu"],  # fmt: skip
        "score the test split (and draw the bits-vs-memory curve)",
    )
    started = time.time()
    loaded, results = evaluate_caps(checkpoint, caps, "test", cpu=True)
    write_tables(results, out, {"checkpoint": str(checkpoint), "split": "test", "max_span": loaded.max_span})
    if caps:
        plot_curve(results, out / "memory_curve.png", title, "byte")
    return results, time.time() - started


def span_map(record: Record, checkpoint: Path, stem: Path) -> List[Path]:
    """The span map of a test passage, as scripts/visualize_spans.py draws it: HTML page and PNG."""
    from fairseq_expire.analysis.runner import load_model, run_blocks
    from fairseq_expire.analysis.spans import SpanPanel, spans_html, spans_png

    offset, length = PASSAGE
    record.add(
        [Path(sys.executable), "scripts/visualize_spans.py", "--checkpoint", checkpoint, "--split", "test",
         "--offset", offset, "--length", length, "--out", stem, "--cpu"],  # fmt: skip
        "the span map of a test passage",
    )
    loaded = load_model(checkpoint, cpu=True)
    tokens = loaded.split_tokens("test", offset, length)
    run = run_blocks(loaded, tokens)
    source = f"test tokens {offset}-{offset + len(tokens) - 1}"
    panels = [SpanPanel(source, loaded.vocabulary.token_strings(tokens), run.spans)]
    heading = f"expire-spans of {checkpoint.name} (L = {loaded.max_span})"
    html_path, png_path = stem.with_suffix(".html"), stem.with_suffix(".png")
    html_path.write_text(
        spans_html(panels, heading, loaded.max_span, [("text", loaded.vocabulary.text(tokens))]),
        encoding="utf-8",
    )
    spans_png(panels, png_path, f"expire-spans, L = {loaded.max_span}", loaded.max_span)
    return [png_path, html_path]


def sample(record: Record, checkpoint: Path) -> List[str]:
    """A short generation from the model, as scripts/generate.py makes it: the text and what it cost."""
    from fairseq_expire.analysis.runner import load_model
    from fairseq_expire.generate import GenerateConfig, generate

    options = [word for name, value in SAMPLE.items() for word in (f"--{name.replace('_', '-')}", value)]
    record.add([Path(sys.executable), "scripts/generate.py", "--checkpoint", checkpoint, *options, "--cpu"],
               "a generation from the Expire-Span model")  # fmt: skip
    loaded = load_model(checkpoint, cpu=True)
    decode, pieces = loaded.vocabulary.text_decoder(), []
    config = GenerateConfig(checkpoint=checkpoint, cpu=True, **SAMPLE)
    result = generate(
        loaded.model, loaded.vocabulary.encode(config.prompt), config, lambda t: pieces.append(decode(t))
    )
    text = (config.prompt + "".join(pieces)).splitlines() or [""]
    memory = " / ".join(f"{kept:.0f}" for kept in result.mem_per_layer)
    return [
        f'A generation from expire_span_lm ({config.max_tokens} bytes after "{config.prompt}", top-p '
        f"{config.sampling_topp}, temperature {config.temperature}; memory kept per layer at the end: {memory}):",
        "",
        *(f"    {line}" for line in text),
    ]


def table(rows: List[dict]) -> List[str]:
    lines = [
        "| model | test bits/byte | memory kept per layer | keys attended per query | training time |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        layers = " / ".join(f"{kept:.0f}" for kept in row["mem_per_layer"])
        lines.append(
            f"| {row['model']} | {row['bits_per_token']:.3f} | {row['mem_avg']:.0f} ({layers}) "
            f"| {row['attn_mem_avg']:.0f} | {row['seconds']:.0f} s |"
        )
    return lines


def meaning(expire: dict, fixed: dict, capped: dict, updates: int) -> List[str]:
    """One or two honest lines on the table: the gain at equal memory, and whether it is more than noise."""
    gain = fixed["bits_per_token"] - expire["bits_per_token"]
    if abs(gain) < 0.02:
        verdict = (
            f"At the same memory both score within {abs(gain):.3f} bits/byte: at this size ({updates} updates "
            "of a 3-layer model on 200 KB) learned expiry gains nothing measurable over keeping the latest bytes"
        )
    elif gain > 0:
        verdict = (
            f"At the same memory Expire-Span scores {gain:.3f} bits/byte better: it keeps what it will need, "
            "where the fixed span keeps the latest bytes (one seed, a small model: a few hundredths is noise)"
        )
    else:
        verdict = (
            f"At the same memory the fixed span scores {-gain:.3f} bits/byte better: at this size ({updates} "
            "updates) learning what to keep has not paid off yet"
        )
    cost = capped["bits_per_token"] - expire["bits_per_token"]
    return [
        verdict + ".",
        f"Capping its spans at {capped['cap']} steps costs {cost:+.3f} bits/byte: "
        + ("it does use its longer memories." if cost > 0.01 else "its longer memories add little here."),
    ]


def main(argv: Optional[List[str]] = None) -> None:
    parser = script_parser("make demo", __doc__)
    parser.add_argument(
        "--work", type=Path, default=Path("demo"), help="where data, checkpoints and the record go"
    )
    parser.add_argument("--corpus", type=Path, default=LICENSES, help="a directory of plain text files")
    parser.add_argument(
        "--updates",
        type=int,
        default=1500,
        help="training updates per model (1500: about 2 minutes each on 2 cores)",
    )
    args = parser.parse_args(argv)
    if args.updates < 1:
        raise UsageError(f"--updates {args.updates}: must be an integer >= 1")
    files = corpus_files(args.corpus)
    data, checkpoints, logs, figures = (
        args.work / name for name in ("data-bin", "checkpoints", "logs", "figures")
    )
    for directory in (logs, figures):
        directory.mkdir(parents=True, exist_ok=True)
    record, started = Record(args.work), time.time()

    print(f"[1/4] preparing {len(files)} texts of {args.corpus} as bytes in {data}", flush=True)
    from fairseq_expire.prepare import text
    from fairseq_expire.prepare.cli import main as prepare

    prepare_args = ["--input", *files, "--tokenizer", "bytes", "--newlines", "eos", "--out", data]
    record.add([Path(sys.executable), "scripts/prepare_text.py", *prepare_args], "prepare the corpus")
    prepare(text.prepare_text, text.TextConfig, "", [str(arg) for arg in prepare_args])
    logging.getLogger().setLevel(
        logging.WARNING
    )  # from here on, fairseq's and the analysis' logs go to logs/

    common = [data, "--user-dir", PLUGIN, "--task", "language_modeling_with_memory",
              "--criterion", "expire_span_cross_entropy", *TRAINING]  # fmt: skip
    print(f"[2/4] training expire_span_lm, {args.updates} updates (L = {MAX_SPAN})", flush=True)
    expire = train(record, "expire_span_lm", [*common, "--arch", "expire_span_lm_tiny", *EXPIRE_SPAN],
                   args.updates, checkpoints / "expire_span_lm", logs / "expire_span_lm.log")  # fmt: skip
    span = max(BLOCK, round(float(expire["valid"]["valid_mem_avg"])))  # the previous block is always attended
    print(f"[3/4] training fixed_span_lm the same way, span {span}: the memory Expire-Span kept", flush=True)
    fixed = train(record, "fixed_span_lm", [*common, "--arch", "fixed_span_lm_tiny", "--max-span", span],
                  args.updates, checkpoints / "fixed_span_lm", logs / "fixed_span_lm.log")  # fmt: skip

    print(
        "[4/4] scoring the test split, drawing the span map and the bits-vs-memory curve, generating",
        flush=True,
    )
    best = "checkpoint_best.pt"
    curve, curve_seconds = evaluate(record, checkpoints / "expire_span_lm" / best, CAPS, figures,
                                    "expire_span_lm on test: spans capped at inference")  # fmt: skip
    baseline, _ = evaluate(record, checkpoints / "fixed_span_lm" / best, [], logs / "fixed_span_lm")
    pictures = [*span_map(record, checkpoints / "expire_span_lm" / best, figures / "spans"),
                figures / "memory_curve.png", figures / "memory_curve.csv"]  # fmt: skip
    rows = [
        {**curve[-1].record(), "model": f"expire_span_lm (L = {MAX_SPAN})", "seconds": expire["seconds"]},
        {**baseline[-1].record(), "model": f"fixed_span_lm (span {span})", "seconds": fixed["seconds"]},
    ]
    capped = next(result.record() for result in curve if result.cap == 32)
    report = [
        *table(rows),
        "",
        *meaning(rows[0], rows[1], capped, args.updates),
        "",
        *sample(record, checkpoints / "expire_span_lm" / best),
        "",
        "figures: " + ", ".join(shown(path) for path in pictures),
        f"commands: {shown(record.path)}; full fairseq logs: {shown(logs)}",
        f"total {time.time() - started:.0f} s (test scoring and curve {curve_seconds:.0f} s)",
    ]
    (args.work / "report.md").write_text("\n".join(report) + "\n")
    print("\n" + "\n".join(report))
