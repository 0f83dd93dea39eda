"""The command lines of ``scripts/prepare_*.py``: options from a preparer's config dataclass, one-line errors."""

import sys
from pathlib import Path
from typing import Callable, List, Optional

from fairseq_expire.cli import add_config_options, config_from, script_parser
from fairseq_expire.errors import exit_on_usage_error, setup_logging


def main(prepare: Callable, config_class, description: str, argv: Optional[List[str]] = None):
    """Parse the options into ``config_class`` and run ``prepare(config)`` (bad input: one line, exit status 2)."""
    parser = script_parser(Path(sys.argv[0]).name, description)
    add_config_options(parser, config_class)
    args = parser.parse_args(argv)
    setup_logging()
    return exit_on_usage_error(
        parser.prog, lambda: prepare(config_from(args, config_class)), rerun_continues=True
    )
