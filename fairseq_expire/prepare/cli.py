"""The command lines of ``scripts/prepare_*.py``: options from a preparer's config dataclass, one-line errors."""

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Callable, List, Optional

from fairseq_expire.errors import exit_on_usage_error, setup_logging


def _option_type(annotation):
    """(element type, is a list) of a field annotation such as ``int``, ``Optional[Path]`` or ``List[str]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        return _option_type(next(a for a in args if a is not type(None)))
    if origin in (list, List):
        return args[0], True
    return annotation, False


def build_parser(config_class, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for option in dataclasses.fields(config_class):
        name = "--" + option.name.replace("_", "-")
        default = option.default if option.default is not dataclasses.MISSING else option.default_factory()
        element, many = _option_type(option.type)
        help_text = option.metadata["help"].replace("%", "%%")
        if element is bool:
            parser.add_argument(name, action="store_true", help=help_text)
            continue
        if default is not None and default != []:
            shown = " ".join(map(str, default)) if many else default
            help_text += f" (default: {shown})".replace("%", "%%")
        parser.add_argument(
            name,
            type=element,
            nargs="+" if many else None,
            default=default,
            choices=option.metadata.get("choices"),
            required=option.metadata.get("required", False),
            metavar=option.metadata.get("metavar"),
            help=help_text,
        )
    return parser


def main(prepare: Callable, config_class, description: str, argv: Optional[List[str]] = None):
    """Parse the options into ``config_class`` and run ``prepare(config)`` (bad input: one line, exit status 2)."""
    parser = build_parser(config_class, Path(sys.argv[0]).name, description)
    args = parser.parse_args(argv)
    setup_logging()
    config = config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})
    return exit_on_usage_error(parser.prog, lambda: prepare(config), rerun_continues=True)
