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

import argparse
import sys
from pathlib import Path

from fairseq_expire.launch import LaunchError
from fairseq_expire.launch.executors import add_resource_arguments, make_executor, resources_from
from fairseq_expire.launch.fairseq_args import check_not_launcher_options, parse_train_args, with_user_dir
from fairseq_expire.launch.train_job import TrainJob


def split_at_dashes(argv):
    """The launcher's own arguments and fairseq-train's (after the first ``--``)."""
    if "--" not in argv:
        return argv, None
    index = argv.index("--")
    return argv[:index], argv[index + 1 :]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [launcher options] -- DATA [fairseq-train arguments]",
    )  # fmt: skip
    add_resource_arguments(parser)
    parser.add_argument(
        "--save-dir", help="checkpoints go here (default checkpoints/NAME); logs in SAVE_DIR/logs"
    )
    parser.add_argument(
        "--master-port", type=int, help="port of the rank-0 rendezvous (default: from the job id)"
    )
    parser.add_argument(
        "--wait", action="store_true", help="wait for the run to end (always with local and debug)"
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    own, fairseq_args = split_at_dashes(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    if not fairseq_args:
        parser.error("give fairseq-train's arguments after `--`, starting with the data directory")
    executor_kind = args.executor or "slurm"
    try:
        resources = resources_from({**vars(args), "cpu": args.cpu or "--cpu" in fairseq_args})
        check_not_launcher_options(fairseq_args, resources.cpu)
        fairseq_args = with_user_dir(fairseq_args)
        parse_train_args(fairseq_args)
        save_dir = Path(args.save_dir or f"checkpoints/{resources.name}").resolve()
        executor = make_executor(executor_kind, save_dir / "logs", resources)
    except LaunchError as error:
        parser.exit(2, f"launch.py: error: {error}\n")

    resuming = (save_dir / "checkpoint_last.pt").exists()
    try:
        job = executor.submit(TrainJob(fairseq_args, str(save_dir), resources.cpu, args.master_port))
    except Exception as error:  # sbatch's own refusal (resources the cluster cannot give, bad account...)
        parser.exit(1, f"launch.py: error: submission failed: {' '.join(str(error).split())[-2000:]}\n")
    print(f"Submitted job {job.job_id} ({executor_kind}: {resources.describe()})")
    print(f"  checkpoints: {save_dir}" + ("  (resuming from checkpoint_last.pt)" if resuming else ""))
    print(
        f"  log:         {job.paths.stdout}"
        + ("  (rank 0; rank k: ..._k_log.out)" if resources.num_tasks > 1 else "")
    )
    if executor_kind == "slurm":
        print(f"  follow:      tail -f {job.paths.stdout}    cancel: scancel {job.job_id}")
    if not (args.wait or executor_kind != "slurm"):
        return 0
    try:
        job.results()
    except Exception as error:  # submitit reports the job's own traceback, or why it ended
        print(
            f"Job {job.job_id} failed: {str(error).strip()[-3000:]}\n  log: {job.paths.stdout}",
            file=sys.stderr,
        )
        return 1
    print(f"Job {job.job_id} finished: checkpoints in {save_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
