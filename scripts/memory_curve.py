#!/usr/bin/env python3
"""Bits per token against memory: one checkpoint with its spans capped at several values (paper Figures 7, 10).

    python scripts/memory_curve.py --checkpoint demo/checkpoints/expire_span_lm/checkpoint_best.pt \\
        --split test --caps 16 64 256 1024 --compare 64 none --out demo/memory_curve

Each cap is the evaluation option inference_max_span (fairseq-eval-lm --model-overrides
"{'inference_max_span': N}"); no cap is always evaluated too. Each run scores the whole split from an empty
memory as fairseq-eval-lm --batch-size STREAMS does. Writes OUT/memory_curve.csv and .json (bits per token, memory
kept per layer, mean span, per cap) and OUT/memory_curve.png (bits per token against the memory kept). With
--compare A B it also lists the tokens whose loss drops most from cap A to cap B, with the text before them:
what needs the long memory.
"""

import argparse
from pathlib import Path

from fairseq_expire.analysis.curve import (
    cap_label,
    evaluate_caps,
    long_memory_tokens,
    parse_cap,
    per_token_name,
    plot_curve,
    write_tables,
)


def cap_argument(text: str):
    try:
        return parse_cap(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def one_line(text: str) -> str:
    return text.replace("\n", "\N{DOWNWARDS ARROW WITH CORNER LEFTWARDS}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint of fairseq-train")
    parser.add_argument("--data", type=Path, help="its data directory (default: the one in the checkpoint)")
    parser.add_argument("--split", default="test", help="the binarized split to score")
    parser.add_argument(
        "--caps", type=cap_argument, nargs="+", default=[16, 64, 256, 1024], help="span caps; 'none': no cap"
    )
    parser.add_argument(
        "--streams", type=int, default=1, help="streams run side by side (eval-lm --batch-size)"
    )
    parser.add_argument(
        "--compare", type=cap_argument, nargs=2, metavar=("A", "B"), help="tokens B helps most"
    )
    parser.add_argument("--top", type=int, default=20, help="tokens listed by --compare")
    parser.add_argument("--context", type=int, default=40, help="tokens of text shown before each listed one")
    parser.add_argument("--out", type=Path, default=Path("memory_curve"), help="output directory")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if there is a GPU")
    args = parser.parse_args()

    caps = args.caps + (args.compare or [])
    loaded, results = evaluate_caps(args.checkpoint, caps, args.split, args.data, args.streams, args.cpu)
    unit = per_token_name(loaded.vocabulary)
    info = {
        "checkpoint": str(args.checkpoint),
        "data": str(loaded.data_dir),
        "split": args.split,
        "tokens": len(results[0].run.tokens),
        "streams": args.streams,
        "max_span": loaded.max_span,
        "block_size": loaded.block_size,
        "unit": unit,
    }
    print(f"{args.split}: {info['tokens']} tokens, L = {loaded.max_span}, {loaded.num_layers} layers")
    print(f"{'cap':>6}  bits/{unit:<9}  memory kept per layer (mean; per layer)")
    for result in results:
        record = result.record()
        layers = " ".join(f"{kept:.0f}" for kept in record["memory_per_layer"])
        print(f"{record['cap']:>6}  {record['bits_per_token']:14.4f}  {record['memory_mean']:8.1f}; {layers}")

    if args.compare:
        by_cap = {result.cap: result for result in results}
        short, long = (by_cap[cap] for cap in args.compare)
        info["compare"] = long_memory_tokens(short, long, loaded.vocabulary, args.top, args.context)
        print(
            f"\ncap {cap_label(short.cap)} -> {cap_label(long.cap)}: {info['compare']['mean_gain_bits']:+.4f} bits "
            f"per {unit} on average; the {args.top} tokens it helps most (bits saved, then the text before them):"
        )
        for row in info["compare"]["top_tokens"]:
            print(
                f"{row['gain_bits']:7.2f}  @{row['position']:<8} ...{one_line(row['context'])}[{one_line(row['token'])}]"
            )

    csv_path, json_path = write_tables(results, args.out, info)
    png_path = args.out / "memory_curve.png"
    plot_curve(results, png_path, f"{args.checkpoint.name} on {args.split}: inference caps on the span", unit)
    print(f"\nwrote {csv_path}, {json_path}, {png_path}")


if __name__ == "__main__":
    main()
