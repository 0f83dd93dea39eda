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

import argparse
import datetime
import sys
from pathlib import Path

from fairseq_expire.launch import LaunchError
from fairseq_expire.launch.executors import add_resource_arguments, make_executor, resources_from
from fairseq_expire.launch.fairseq_args import (
    check_not_launcher_options,
    grid_point_args,
    parse_train_args,
    with_json_logs,
    with_user_dir,
)
from fairseq_expire.launch.sweep import (
    RESULT_COLUMNS,
    check_save_root,
    collect,
    expand,
    format_table,
    job_states,
    load_grid,
    point_names,
    read_manifest,
    write_manifest,
)
from fairseq_expire.launch.train_job import TrainJob

COMMANDS = ("submit", "status", "collect")


def submit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweep.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [submit] --grid GRID.yaml | --grid KEY=V1,V2 ... [options] [-- DATA fairseq-train args]",
    )  # fmt: skip
    parser.add_argument(
        "--grid",
        nargs="+",
        required=True,
        metavar="GRID",
        help="a YAML grid file, or fairseq-train options with values: lr=1e-3,3e-3 max-span=64",
    )
    add_resource_arguments(parser)
    parser.add_argument(
        "--save-dir", help="the sweep's directory (default checkpoints/<grid file name or NAME>)"
    )
    parser.add_argument(
        "--array-parallelism", type=int, help="at most this many jobs of the array run at once"
    )
    parser.add_argument(
        "--master-port", type=int, help="port of each job's rank-0 rendezvous (default: job id)"
    )
    return parser  # fmt: skip


def results_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"sweep.py {command}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("save_dir", help="the sweep's directory (holding sweep.json)")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    parser.add_argument("--output", help="also write the table to this file")
    return parser


def submit(argv) -> int:
    parser = submit_parser()
    own, fairseq_cli = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    args = parser.parse_args(own)
    try:
        spec = load_grid(args.grid)
        fairseq_args = spec.fairseq_args + fairseq_cli
        if not fairseq_args:
            raise LaunchError(
                "no fairseq-train arguments: give them after `--` or in the grid file's `fairseq:`"
            )
        given = {key: value for key, value in vars(args).items() if value is not None}
        options = {**spec.launch, **given}
        unknown = sorted(set(spec.launch) - set(vars(args)))
        if unknown:
            raise LaunchError(f"grid file `launch:` has unknown option(s) {', '.join(unknown)}")
        default_name = spec.path.stem if spec.path else options.get("name") or "sweep"
        root = Path(options.get("save_dir") or f"checkpoints/{default_name}").resolve()
        check_save_root(root)
        cpu = options.get("cpu") or "--cpu" in fairseq_args
        resources = resources_from({**options, "cpu": cpu, "name": options.get("name") or root.name})
        points = expand(spec.grid)
        names = point_names(points)
        check_not_launcher_options(fairseq_args + [f"--{key}" for key in spec.grid], resources.cpu)
        fairseq_args = with_user_dir(with_json_logs(fairseq_args))
        for point, name in zip(points, names):
            parse_train_args(fairseq_args + grid_point_args(point), f"grid point {name}", list(spec.grid))
        executor_kind = options.get("executor") or "slurm"
        executor = make_executor(executor_kind, root / "logs", resources, options.get("array_parallelism"))
    except LaunchError as error:
        parser.exit(2, f"sweep.py: error: {error}\n")

    manifest = {
        "name": root.name,
        "submitted": datetime.datetime.now().isoformat(timespec="seconds"),
        "executor": executor_kind,
        "command": [sys.argv[0], *argv],
        "grid": spec.grid,
        "fairseq_args": fairseq_args,
        "resources": resources.as_dict(),
        "jobs": [],
    }
    manifest_path = write_manifest(root, manifest)  # claims the directory before anything runs in it
    jobs = []
    try:
        with executor.batch():
            for point, name in zip(points, names):
                job = TrainJob(fairseq_args + grid_point_args(point), str(root / name), resources.cpu,
                               options.get("master_port"))  # fmt: skip
                jobs.append(executor.submit(job))
    except Exception as error:  # sbatch refused the array: nothing runs, so the directory is free again
        manifest_path.unlink()
        parser.exit(1, f"sweep.py: error: submission failed: {' '.join(str(error).split())[-2000:]}\n")
    manifest["jobs"] = [
        {
            "job_id": job.job_id,
            "name": name,
            "params": point,
            "save_dir": str(root / name),
            "log": str(job.paths.stdout),
        }
        for job, name, point in zip(jobs, names, points)
    ]
    write_manifest(root, manifest)
    print(f"Submitted sweep {root.name}: {len(jobs)} jobs ({executor_kind}: {resources.describe()} each)")
    print(format_table(manifest["jobs"], ("job_id", "name", "log")), end="")
    print(f"manifest: {root / 'sweep.json'}\nstatus:   {Path(sys.argv[0]).as_posix()} status {root}\n"
          f"results:  {Path(sys.argv[0]).as_posix()} collect {root}")  # fmt: skip
    if executor_kind == "debug":
        for job in jobs:
            job.exception()  # runs it here; a failure shows in `collect`
    return 0


def report(command: str, argv) -> int:
    parser = results_parser(command)
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(Path(args.save_dir))
        keys = list(manifest["grid"])
        if command == "status":
            states = job_states(manifest)
            rows = [{"job": job["job_id"], **job["params"], "state": states[job["job_id"]], "log": job["log"]}
                    for job in manifest["jobs"]]  # fmt: skip
            table = format_table(rows, ["job", *keys, "state", "log"], args.format)
        else:
            table = format_table(collect(manifest), ["job", *keys, *RESULT_COLUMNS], args.format)
    except LaunchError as error:
        parser.exit(2, f"sweep.py {command}: error: {error}\n")
    print(table, end="")
    if args.output:
        Path(args.output).write_text(table)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "submit"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    return submit(rest) if command == "submit" else report(command, rest)


if __name__ == "__main__":
    sys.exit(main())
