#!/usr/bin/env python3
"""What each layer keeps: the expire-span of every token, as an HTML page and a PNG heatmap (paper Figs. 9, 12).

    python scripts/visualize_spans.py --checkpoint demo/checkpoints/expire_span_lm/checkpoint_best.pt \\
        --text-file /usr/share/common-licenses/GPL-3 --length 600 --out spans
    python scripts/visualize_spans.py --checkpoint CKPT --split test --offset 5000 --length 400 --out spans
    python scripts/visualize_spans.py --checkpoint CKPT --text "..." --edit Licensee=Customer --out edit

The text is fed block by block (--tokens-per-sample of the checkpoint) with the memory carried, from an empty
memory, as fairseq-eval-lm does. Writes OUT.html (one row per layer, hover a token for its span, then the text)
and OUT.png (layers x tokens; --width pixels wide, 72 + 32 per layer pixels high per panel). With --edit OLD=NEW
the first whole-word OLD is replaced by NEW, both texts are run, and a third panel shows how each later token's
span changed (red: kept longer after the edit, blue: shorter; grey: tokens the edit added).
"""

import argparse
from pathlib import Path

from fairseq_expire.analysis.runner import load_model, run_blocks
from fairseq_expire.analysis.spans import (
    SpanPanel,
    aligned_baseline,
    apply_edit,
    layer_summary,
    spans_html,
    spans_png,
)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    args = parser.parse_args()

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
        print(
            f"{row['layer']:>5}  {row['mean_span']:9.1f}  {row['max_span']:8.1f}  {row['memory_kept']:11.1f}"
        )
    print(f"wrote {html_path}")
    if not args.no_png:
        spans_png(panels, png_path, f"expire-spans, L = {loaded.max_span}{cap}", loaded.max_span, args.width)
        print(f"wrote {png_path}")


if __name__ == "__main__":
    main()
