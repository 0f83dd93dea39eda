"""The command lines of ``scripts/launch.py`` (one run) and ``scripts/sweep.py`` (a job array and its results).

Everything a command line gives is checked (resources, fairseq-train's own parser on every grid point) before
anything is submitted; a problem is one line (:class:`~fairseq_expire.errors.UsageError`, exit status 2).
"""

import argparse
import datetime
import sys
from pathlib import Path

from fairseq_expire.cli import script_parser
from fairseq_expire.errors import exit_on_usage_error
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


def split_at_dashes(argv):
    """The launcher's own arguments and fairseq-train's (after the first ``--``)."""
    if "--" not in argv:
        return argv, None
    index = argv.index("--")
    return argv[:index], argv[index + 1 :]


def add_job_arguments(parser: argparse.ArgumentParser, save_dir_help: str) -> None:
    """What every submission takes: the resources, where it saves, and its rendezvous port."""
    add_resource_arguments(parser)
    parser.add_argument("--save-dir", help=save_dir_help)
    parser.add_argument(
        "--master-port", type=int, help="port of each job's rank-0 rendezvous (default: from the job id)"
    )


def launch_parser(description: str) -> argparse.ArgumentParser:
    usage = "%(prog)s [launcher options] -- DATA [fairseq-train arguments]"
    parser = script_parser("launch.py", description, usage=usage)
    add_job_arguments(parser, "checkpoints go here (default checkpoints/NAME); logs in SAVE_DIR/logs")
    parser.add_argument(
        "--wait", action="store_true", help="wait for the run to end (always with local and debug)"
    )
    return parser


def launch_main(description: str, argv=None) -> int:
    """``scripts/launch.py``: check everything, submit one run, say where it is (and wait for it if asked)."""
    return exit_on_usage_error("launch.py", lambda: launch(description, argv))


def launch(description: str, argv=None) -> int:
    parser = launch_parser(description)
    own, fairseq_args = split_at_dashes(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    if not fairseq_args:
        parser.error("give fairseq-train's arguments after `--`, starting with the data directory")
    executor_kind = args.executor or "slurm"
    resources = resources_from({**vars(args), "cpu": args.cpu or "--cpu" in fairseq_args})
    check_not_launcher_options(fairseq_args, resources.cpu)
    fairseq_args = with_user_dir(fairseq_args)
    parse_train_args(fairseq_args)
    save_dir = Path(args.save_dir or f"checkpoints/{resources.name}").resolve()
    executor = make_executor(executor_kind, save_dir / "logs", resources)

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


COMMANDS = ("submit", "status", "collect")


def submit_parser(description: str) -> argparse.ArgumentParser:
    usage = "%(prog)s [submit] --grid GRID.yaml | --grid KEY=V1,V2 ... [options] [-- DATA fairseq-train args]"
    parser = script_parser("sweep.py", description, usage=usage)
    parser.add_argument(
        "--grid",
        nargs="+",
        required=True,
        metavar="GRID",
        help="a YAML grid file, or fairseq-train options with values: lr=1e-3,3e-3 max-span=64",
    )
    add_job_arguments(parser, "the sweep's directory (default checkpoints/<grid file name or NAME>)")
    parser.add_argument(
        "--array-parallelism", type=int, help="at most this many jobs of the array run at once"
    )
    return parser


def results_parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = script_parser(f"sweep.py {command}", description)
    parser.add_argument("save_dir", help="the sweep's directory (holding sweep.json)")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    parser.add_argument("--output", help="also write the table to this file")
    return parser


def submit(argv, description: str) -> int:
    parser = submit_parser(description)
    own, fairseq_cli = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    args = parser.parse_args(own)

    spec = load_grid(args.grid)
    fairseq_args = spec.fairseq_args + fairseq_cli
    if not fairseq_args:
        raise LaunchError("no fairseq-train arguments: give them after `--` or in the grid file's `fairseq:`")
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


def report(command: str, argv, description: str) -> int:
    parser = results_parser(command, description)
    args = parser.parse_args(argv)

    manifest = read_manifest(Path(args.save_dir))
    keys = list(manifest["grid"])
    if command == "status":
        states = job_states(manifest)
        rows = [{"job": job["job_id"], **job["params"], "state": states[job["job_id"]], "log": job["log"]}
                for job in manifest["jobs"]]  # fmt: skip
        table = format_table(rows, ["job", *keys, "state", "log"], args.format)
    else:
        table = format_table(collect(manifest), ["job", *keys, *RESULT_COLUMNS], args.format)
    print(table, end="")
    if args.output:
        Path(args.output).write_text(table)
    return 0


def sweep_main(description: str, argv=None) -> int:
    """``scripts/sweep.py``: ``submit`` (the default), ``status`` or ``collect``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "submit"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    if command == "submit":
        return exit_on_usage_error("sweep.py", lambda: submit(rest, description))
    return exit_on_usage_error(f"sweep.py {command}", lambda: report(command, rest, description))
