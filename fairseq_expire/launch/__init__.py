"""Submitting ``fairseq-train`` runs with submitit: one run (``scripts/launch.py``) or a grid sweep as a Slurm job
array (``scripts/sweep.py``), with fairseq's distributed arguments set for every task and requeue on preemption.

Nothing here is imported by ``--user-dir fairseq_expire``; the scripts import it.
"""

from fairseq_expire.errors import UsageError


class LaunchError(UsageError):
    """Bad input or an unusable cluster, found before anything was submitted; the message says how to fix it."""
