"""The plugin's error for bad input: the option to change and how, printed by the console scripts as one line.

Defined in :mod:`fairseq_expire_compat`, whose console-script fix prints it (``error: ...``, exit status 1), also
when fairseq wrapped it into an error of its own; raise it for anything a user can fix on the command line.
"""

from fairseq_expire_compat import UsageError

__all__ = ["UsageError"]
