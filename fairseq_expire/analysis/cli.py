"""The command lines of ``scripts/memory_curve.py`` and ``scripts/visualize_spans.py`` (their docstrings say what
they do): options, the run, the figures and tables written, and the report printed."""

import argparse
from pathlib import Path
from typing import List, Optional

from fairseq_expire.analysis.curve import (
    cap_label,
    evaluate_caps,
    long_memory_tokens,
    parse_cap,
    per_token_name,
    plot_curve,
    write_tables,
)
from fairseq_expire.analysis.runner import load_model, run_blocks
from fairseq_expire.analysis.spans import (
    SpanPanel,
    aligned_baseline,
    apply_edit,
    layer_summary,
    spans_html,
    spans_png,
)
from fairseq_expire.cli import script_parser


def cap_argument(text: str):
    try:
        return parse_cap(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def one_line(text: str) -> str:
    return text.replace("\n", "\N{DOWNWARDS ARROW WITH CORNER LEFTWARDS}")


def memory_curve_main(description: str, argv: Optional[List[str]] = None) -> None:
    parser = script_parser("memory_curve.py", description)
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
    args = parser.parse_args(argv)

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
        layers = " ".join(f"{kept:.0f}" for kept in record["mem_per_layer"])
        print(f"{record['cap']:>6}  {record['bits_per_token']:14.4f}  {record['mem_avg']:8.1f}; {layers}")

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


def visualize_spans_main(description: str, argv: Optional[List[str]] = None) -> None:
    parser = script_parser("visualize_spans.py", description)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint of fairseq-train")
    parser.add_argument("--data", type=Path, help="its data directory (default: the one in the checkpoint)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to run (byte- or character-level models)")
    source.add_argument("--text-file", type=Path, help="a UTF-8 file with the text to run")
    source.add_argument("--split", help="a binarized split of the data directory (e.g. test)")
    parser.add_argument("--offset", type=int, default=0, help="first token (--split) or character (text)")
    parser.add_argument(
        "--length", type=int, default=512, help="tokens (--split) or characters (text) to show"
    )
    parser.add_argument(
        "--edit", metavar="OLD=NEW", help="also run the text with the word OLD replaced by NEW"
    )
    parser.add_argument(
        "--cap", type=int, help="cap spans at this many steps (inference_max_span, Figure 10)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("spans"), help="writes OUT.html and OUT.png (OUT may end in .png)"
    )
    parser.add_argument("--width", type=int, default=1280, help="PNG width in pixels")
    parser.add_argument("--no-png", action="store_true", help="only the HTML page (no matplotlib needed)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if there is a GPU")
    args = parser.parse_args(argv)

    loaded = load_model(args.checkpoint, args.data, inference_max_span=args.cap, cpu=args.cpu)
    vocabulary = loaded.vocabulary
    if args.split is not None:
        split_tokens = loaded.split_tokens(args.split, args.offset, args.length)
        text = vocabulary.text(split_tokens)
        source = f"{args.split} tokens {args.offset}-{args.offset + len(split_tokens) - 1}"
    else:
        text = args.text if args.text is not None else args.text_file.read_text(encoding="utf-8")
        text = text[args.offset : args.offset + args.length]
        source = "text" if args.text is not None else args.text_file.name
    # an edit is made in the text: both runs then encode a text, and differ by the edit only
    tokens = split_tokens if args.split is not None and not args.edit else vocabulary.encode(text)
    run = run_blocks(loaded, tokens)
    panels = [
        SpanPanel(
            f"{source} (original)" if args.edit else source, vocabulary.token_strings(tokens), run.spans
        )
    ]
    texts = [("text", text)]
    if args.edit:
        edited_text, position = apply_edit(text, args.edit)
        edited = run_blocks(loaded, vocabulary.encode(edited_text))
        strings = vocabulary.token_strings(edited.tokens)
        panels += [
            SpanPanel(f"edited: {args.edit} at character {position}", strings, edited.spans),
            SpanPanel("change of span after the edit", strings, edited.spans, aligned_baseline(run, edited)),
        ]
        texts = [("original text", text), ("edited text", edited_text)]

    cap = f", spans capped at {args.cap}" if args.cap else ""
    heading = f"expire-spans of {args.checkpoint.name} (L = {loaded.max_span}{cap})"
    stem = args.out.with_suffix("") if args.out.suffix in (".html", ".png") else args.out
    html_path, png_path = Path(f"{stem}.html"), Path(f"{stem}.png")
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(spans_html(panels, heading, loaded.max_span, texts), encoding="utf-8")
    print(
        f"{len(tokens)} tokens, {loaded.num_layers} layers, block {loaded.block_size}, L = {loaded.max_span}"
    )
    print("layer  mean span  max span  memory kept")
    for row in layer_summary(run):
        print(f"{row['layer']:>5}  {row['span_avg']:9.1f}  {row['span_max']:8.1f}  {row['mem']:11.1f}")
    print(f"wrote {html_path}")
    if not args.no_png:
        spans_png(panels, png_path, f"expire-spans, L = {loaded.max_span}{cap}", loaded.max_span, args.width)
        print(f"wrote {png_path}")
