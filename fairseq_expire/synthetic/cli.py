"""Command line of ``scripts/generate_synthetic.py``: one sub-command per task, and ``all``."""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from fairseq_expire.cli import add_config_options, config_from
from fairseq_expire.errors import exit_on_usage_error, setup_logging

from .common import GENERATORS, SPLITS, generate_dataset

DEFAULT_TOKENS = {"train": 1_000_000, "valid": 100_000, "test": 100_000}


def token_count(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} tokens: a split needs at least one token")
    return value


def add_common_options(parser: argparse.ArgumentParser, out_help: str):
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    parser.add_argument("--seed", type=int, default=1, help="same seed, same bytes (default: %(default)s)")
    for split in SPLITS:
        parser.add_argument(
            f"--{split}-tokens",
            type=token_count,
            default=DEFAULT_TOKENS[split],
            help=f"size of the {split} split: whole episodes or steps, at most this many tokens (default: %(default)s)",
        )
    parser.add_argument(
        "--no-raw-text",
        action="store_true",
        help="skip the human-readable OUT/raw/{split}.txt and {split}.labels.txt (training needs only the binaries)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an output made with other options (the same request again does nothing without it)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate_synthetic.py",
        description="Generate the synthetic tasks of the Expire-Span paper as fairseq data for "
        "--task language_modeling_with_memory (tokens plus a label stream scored as acc/err).",
    )
    tasks = parser.add_subparsers(
        dest="task", required=True, metavar="TASK", help=f"{', '.join(GENERATORS)} or all"
    )
    for name, generator in GENERATORS.items():
        sub = tasks.add_parser(
            name,
            help=generator.__doc__,
            description=sys.modules[generator.__module__].__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_common_options(sub, "the data-bin directory to write")
        add_config_options(sub, generator.config_class)
    everything = tasks.add_parser("all", help="every task with its default options, each into OUT/TASK")
    add_common_options(everything, "the directory that receives one data-bin directory per task")
    return parser


def main(argv: Optional[List[str]] = None):
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    exit_on_usage_error(parser.prog, lambda: generate(args), rerun_continues=True)


def generate(args: argparse.Namespace):
    sizes = {split: getattr(args, f"{split}_tokens") for split in SPLITS}
    if args.task == "all":
        tasks = [(GENERATORS[name](GENERATORS[name].config_class()), args.out / name) for name in GENERATORS]
    else:
        generator = GENERATORS[args.task]
        tasks = [(generator(config_from(args, generator.config_class)), args.out)]
    raw_text = not args.no_raw_text
    for task, out in tasks:  # refuse before writing anything
        generate_dataset(task, out, sizes, args.seed, raw_text, args.force, check_only=True)
    for task, out in tasks:
        generate_dataset(task, out, sizes, args.seed, raw_text, args.force)
