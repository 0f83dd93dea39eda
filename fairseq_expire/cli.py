"""What every command line of this project shares: its parser, options declared as dataclass fields, and the
dataclass built back from the parsed options. Errors and logging: :mod:`fairseq_expire.errors`."""

import argparse
import dataclasses
import typing
from dataclasses import field
from typing import List


def script_parser(prog: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """A project script's parser: its description (a module docstring) printed as written."""
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
    )


def option(default, help: str, **metadata):
    """A tool's option as a dataclass field: its default, its help, and ``choices``, ``metavar``, ``required``."""
    return field(default=default, metadata={"help": help, **metadata})


def list_option(factory, help: str, **metadata):
    """An option that takes one or more values, its default made by ``factory``."""
    return field(default_factory=factory, metadata={"help": help, **metadata})


def _option_type(annotation):
    """(element type, is a list) of a field annotation such as ``int``, ``Optional[Path]`` or ``List[str]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        return _option_type(next(a for a in args if a is not type(None)))
    if origin in (list, List):
        return args[0], True
    return annotation, False


def add_config_options(parser: argparse.ArgumentParser, config_class) -> None:
    """One ``--option-name`` per field of ``config_class``, its help ending with the default."""
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


def config_from(args: argparse.Namespace, config_class):
    """The ``config_class`` of the parsed options that :func:`add_config_options` added."""
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})
