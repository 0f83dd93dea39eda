#!/usr/bin/env python
"""Grid sweeps of fairseq-train as a Slurm job array (submitit), and their results in one command.

    python scripts/sweep.py --grid sweeps/enwik8_alpha.yaml             # everything in the grid file
    python scripts/sweep.py --grid lr=7e-4,3.5e-4 expire-span-alpha=1e-6,2e-6 --save-dir checkpoints/alpha \\
        --gpus-per-node 8 --array-parallelism 4 -- data-bin/enwik8 --user-dir fairseq_expire ...
    python scripts/sweep.py status checkpoints/alpha                    # state and log of every job
    python scripts/sweep.py collect checkpoints/alpha [--format csv]    # hyper-parameters and results table

Each grid point is one job with its own save dir, SAVE_DIR/<key=value_key=value>, and SAVE_DIR/sweep.json lists
them all. Every grid point is checked with fairseq-train's own parser before anything is submitted. Job states
(FAILED, CANCELLED...) come from Slurm accounting (sacct).
"""

import sys

from fairseq_expire.launch.cli import sweep_main

if __name__ == "__main__":
    sys.exit(sweep_main(__doc__))
