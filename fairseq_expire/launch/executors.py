"""Where a run goes: Slurm when its controller answers, or this machine when asked (``local``, ``debug``).

Never a silent fallback: submitit's ``AutoExecutor`` picks Slurm whenever ``srun`` is on PATH, even with no
controller up, and a launcher that quietly ran an 8-node job on the login node would be worse than an error.
"""

import argparse
import math
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import submitit

from fairseq_expire.launch import LaunchError

EXECUTORS = ("slurm", "local", "debug")
SLURM_COMMANDS = ("sbatch", "srun", "scontrol", "sinfo")
_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")
_MEMORY = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)


@dataclass
class Resources:
    """What one run asks for: one task per GPU, or ``tasks_per_node`` processes per node on CPU."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpu: bool = False
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    time_min: int = 24 * 60
    partition: Optional[str] = None
    constraint: Optional[str] = None
    name: str = "expire-span"

    @property
    def num_tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    def describe(self) -> str:
        unit = "CPU processes" if self.cpu else "GPUs (one task each)"
        return f"{self.nodes} node(s) x {self.tasks_per_node} {unit}"

    def as_dict(self) -> dict:
        return asdict(self)


def parse_time_minutes(text: str) -> int:
    """Slurm's time formats (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) in minutes.

    submitit needs minutes to tell a timeout from a preemption when the job is signalled.
    """
    match = _TIME.match(str(text).strip())
    if not match:
        raise LaunchError(f"--time {text!r} is not a Slurm time: use minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(v) if v is not None else None for v in match.group("days", "a", "b", "c"))
    if days is None:
        hours, minutes, seconds = (a, b, c) if c is not None else (0, a, b or 0)
    else:
        hours, minutes, seconds = a, b or 0, c or 0
    minutes_total = ((days or 0) * 24 + hours) * 60 + minutes + seconds / 60
    if minutes_total <= 0:
        raise LaunchError(f"--time {text!r} is zero")
    return math.ceil(minutes_total)


def add_resource_arguments(parser: argparse.ArgumentParser) -> None:
    """The options a run shares with every job of a sweep. Defaults are None so a grid file can set them."""
    group = parser.add_argument_group("resources")
    group.add_argument(
        "--executor",
        choices=EXECUTORS,
        help="slurm (default; needs a controller that answers), "
        "local (subprocesses on this machine) or debug (in this process, one task)",
    )
    group.add_argument("--nodes", type=int, help="nodes per run (default 1)")
    group.add_argument("--gpus-per-node", type=int, help="GPUs per node, one fairseq task each (default 1)")
    group.add_argument(
        "--cpu",
        action="store_true",
        default=None,
        help="train on CPU (gloo, legacy_ddp): for tests and clusters without GPUs",
    )
    group.add_argument("--tasks-per-node", type=int, help="CPU processes per node with --cpu (default 1)")
    group.add_argument("--cpus-per-task", type=int, help="CPU cores per task (data loading workers + 1)")
    group.add_argument("--mem", help="memory per node in Slurm's syntax, e.g. 64G (0 = all of it)")
    group.add_argument(
        "--time", help="time limit in Slurm's syntax, e.g. 72:00:00 or 3-00:00:00 (default 24 h)"
    )
    group.add_argument("--partition", help="Slurm partition (default: the cluster's default partition)")
    group.add_argument("--constraint", help="Slurm node constraint, e.g. volta32gb")
    group.add_argument("--name", help="job name (default expire-span)")


def resources_from(options: dict) -> Resources:
    """Resources from parsed options (None = not given); checks the combinations that cannot work."""
    cpu = bool(options.get("cpu"))
    gpus, tasks = options.get("gpus_per_node"), options.get("tasks_per_node")
    if cpu and gpus:
        raise LaunchError(
            "--cpu trains without GPUs: drop --gpus-per-node, and give --tasks-per-node instead"
        )
    if not cpu and tasks is not None:
        raise LaunchError(
            "--tasks-per-node is for --cpu runs; on GPUs there is one task per GPU (--gpus-per-node)"
        )
    tasks_per_node = (tasks or 1) if cpu else (gpus or 1)
    for name, value in (
        ("nodes", options.get("nodes")),
        ("tasks-per-node", tasks_per_node),
        ("gpus-per-node", gpus),
    ):
        if value is not None and value < 1:
            raise LaunchError(f"--{name} must be at least 1 (got {value})")
    mem = options.get("mem")
    if mem is not None and not _MEMORY.match(str(mem)):
        raise LaunchError(f"--mem {mem!r} is not a Slurm memory size: use e.g. 64G or 16000M")
    time = options.get("time")
    return Resources(
        nodes=options.get("nodes") or 1,
        gpus_per_node=0 if cpu else tasks_per_node,
        tasks_per_node=tasks_per_node,
        cpu=cpu,
        cpus_per_task=options.get("cpus_per_task"),
        mem=None if mem is None else str(mem),
        time_min=parse_time_minutes(time) if time is not None else Resources.time_min,
        partition=options.get("partition"),
        constraint=options.get("constraint"),
        name=options.get("name") or Resources.name,
    )


def _run(command, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(
            command, 124, "", f"`{' '.join(command)}` gave no answer in {timeout} s"
        )


def check_slurm(partition: Optional[str] = None) -> None:
    """Slurm's commands exist, its controller answers, and the partition (if any) exists."""
    missing = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
    if missing:
        raise LaunchError(
            f"Slurm's commands ({', '.join(missing)}) are not on PATH: run this on a Slurm login node, "
            "or pass --executor local to run on this machine"
        )
    ping = _run(["scontrol", "ping"])
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        answer = " ".join((ping.stdout + ping.stderr).split()) or f"exit status {ping.returncode}"
        raise LaunchError(
            f"no Slurm controller answers (`scontrol ping`: {answer}). Check that slurmctld runs and that "
            "SLURM_CONF (or /etc/slurm/slurm.conf) names it, or pass --executor local to run on this machine"
        )
    if partition is not None:
        listing = _run(["sinfo", "--noheader", "--format", "%R"])
        partitions = sorted(set(listing.stdout.split()))
        if partition not in partitions:
            raise LaunchError(
                f"Slurm partition {partition!r} does not exist; this cluster has: {', '.join(partitions) or 'none'}. "
                "Fix --partition (or leave it out for the default partition)"
            )


def make_executor(
    kind: str, folder: Path, resources: Resources, array_parallelism: Optional[int] = None
) -> submitit.Executor:
    """A submitit executor for ``resources``; its logs (one file per task, stderr included) go to ``folder``."""
    if kind == "slurm":
        check_slurm(resources.partition)
        executor = submitit.SlurmExecutor(folder=folder)
        parameters = dict(
            job_name=resources.name,
            time=resources.time_min,
            nodes=resources.nodes,
            ntasks_per_node=resources.tasks_per_node,
            gpus_per_node=resources.gpus_per_node or None,
            cpus_per_task=resources.cpus_per_task,
            mem=resources.mem,
            partition=resources.partition,
            constraint=resources.constraint,
            array_parallelism=array_parallelism,
            stderr_to_stdout=True,
        )
        executor.update_parameters(**{key: value for key, value in parameters.items() if value is not None})
        return executor
    if kind == "local":
        if resources.nodes > 1:
            raise LaunchError("--executor local runs on this machine only: use --nodes 1 (or Slurm)")
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(
            timeout_min=resources.time_min,
            tasks_per_node=resources.tasks_per_node,
            gpus_per_node=resources.gpus_per_node,
            stderr_to_stdout=True,
        )
        return executor
    if kind == "debug":
        if resources.num_tasks > 1:
            raise LaunchError(
                "--executor debug runs one task in this process: use --executor local for several"
            )
        return submitit.DebugExecutor(folder=folder)
    raise LaunchError(f"unknown executor {kind!r}: choose one of {', '.join(EXECUTORS)}")
