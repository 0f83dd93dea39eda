"""The plugin's one error for bad input, and how every command line turns it into one line.

:class:`UsageError` names the option to change and how. It is defined in :mod:`fairseq_expire_compat`, whose
console-script fix prints it for fairseq's own commands (``error: ...``, exit status 1), also when fairseq wrapped
it into an error of its own. The project's scripts print it with :func:`exit_on_usage_error`. The errors of the
data, launch and analysis tools are subclasses, so one ``except UsageError`` serves them all.
"""

import logging
import sys
from typing import Callable, TypeVar

from fairseq_expire_compat import UsageError

__all__ = ["UsageError", "exit_on_usage_error", "setup_logging"]

T = TypeVar("T")
LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"  # fairseq's


def setup_logging() -> None:
    """fairseq's log format on stdout, for the scripts (importing fairseq configured logging already)."""
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO, stream=sys.stdout, force=True)


def exit_on_usage_error(prog: str, run: Callable[[], T], rerun_continues: bool = False) -> T:
    """``run()``; a :class:`UsageError` ends the process with ``PROG: error: ...`` and exit status 2 (argparse's
    status for bad usage). With ``rerun_continues``, an interrupt ends it with one line saying so (status 130).
    """
    try:
        return run()
    except UsageError as error:
        sys.stderr.write(f"{prog}: error: {error}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        if not rerun_continues:
            raise
        sys.stderr.write(f"{prog}: interrupted; run the same command again to continue\n")
        sys.exit(130)
