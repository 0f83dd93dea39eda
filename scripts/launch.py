#!/usr/bin/env python
"""Submit one fairseq-train run with submitit: to Slurm, or to this machine with --executor local / debug.

    python scripts/launch.py --nodes 4 --gpus-per-node 8 --partition learnfair --time 72:00:00 \\
        --save-dir checkpoints/enwik8 -- data-bin/enwik8 --user-dir fairseq_expire \\
        --task language_modeling_with_memory --arch expire_span_lm_enwik8 \\
        --criterion expire_span_cross_entropy --tokens-per-sample 512 --batch-size 8 ...

Everything after `--` goes to fairseq-train. There is one task per GPU (with --cpu: --tasks-per-node processes
per node, gloo and legacy_ddp); the launcher sets fairseq's distributed options (world size, ranks, init method,
port) for every task. Preemption and timeout requeue the job, which resumes from checkpoint_last.pt in --save-dir.
The arguments are checked with fairseq-train's own parser before anything is submitted.
"""

import sys

from fairseq_expire.launch.cli import launch_main

if __name__ == "__main__":
    sys.exit(launch_main(__doc__))
