"""One fairseq-train run as a submitit job: every task of the job runs the real ``fairseq-train`` with its rank.

The job is pickled by reference, so it lives in this installed package (the job imports it); ``scripts/`` is not
importable there. Preemption and timeout requeue the job through submitit's checkpointing: :meth:`checkpoint`
resubmits the same command, and fairseq-train resumes from ``checkpoint_last.pt`` in the save dir.
"""

import logging
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import submitit

logger = logging.getLogger(__name__)

PORT_BASE, PORT_SPAN = 10000, 20000  # below Linux's ephemeral ports (32768+)


def distributed_args(
    num_tasks: int, rank: int, local_rank: int, master: str, port: int, cpu: bool
) -> List[str]:
    """fairseq's distributed options for one task of ``num_tasks`` (nothing for a single task).

    ``--distributed-no-spawn``: the launcher already runs one process per task; without it fairseq spawns one
    process per visible GPU, which on CPU is zero processes: it exits 0 having trained nothing.
    """
    if num_tasks == 1:
        return []
    args = [
        "--distributed-world-size", str(num_tasks),
        "--distributed-rank", str(rank),
        "--distributed-init-method", f"tcp://{master}:{port}",
        "--distributed-no-spawn",
        "--device-id", str(local_rank),
    ]  # fmt: skip
    if cpu:
        args += ["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]
    return args


def _keep_running_until_requeued():
    """In the fairseq-train child: ignore the signals submitit handles in the task's main process.

    Slurm signals every process of the job. submitit's handler (in the parent) requeues the job on USR2 and
    ignores SIGTERM; a child killed by them first would look like a failed run. The requeue ends the child.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(submitit.JobEnvironment._usr_sig(), signal.SIG_IGN)


def _log_to_job_output() -> None:
    """This module's messages in the task's log (submitit configures only its own logger)."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@dataclass
class TrainJob:
    """``fairseq-train`` with ``fairseq_args`` into ``save_dir``, one process per task of the submitit job."""

    fairseq_args: List[str]
    save_dir: str
    cpu: bool = False
    master_port: Optional[int] = None
    bin_dir: str = field(default_factory=lambda: str(Path(sys.executable).parent))

    def command(self, num_tasks: int, rank: int, local_rank: int, master: str, job_id: str) -> List[str]:
        port = self.master_port or PORT_BASE + int("".join(filter(str.isdigit, job_id)) or 0) % PORT_SPAN
        cpu = ["--cpu"] if self.cpu and "--cpu" not in self.fairseq_args else []
        return [
            str(Path(self.bin_dir) / "fairseq-train"),
            *self.fairseq_args,
            *cpu,
            "--save-dir",
            self.save_dir,
            *distributed_args(num_tasks, rank, local_rank, master, port, self.cpu),
        ]

    def __call__(self) -> str:
        _log_to_job_output()
        env = submitit.JobEnvironment()
        command = self.command(
            env.num_tasks, env.global_rank, env.local_rank, env.hostnames[0], env.raw_job_id
        )
        logger.info(
            "task %d of %d (node %d of %d, %s): %s",
            *(env.global_rank, env.num_tasks, env.node, env.num_nodes, env.hostname, " ".join(command)),
        )
        sys.stdout.flush()
        returncode = subprocess.run(command, preexec_fn=_keep_running_until_requeued).returncode
        if returncode != 0:
            raise RuntimeError(
                f"fairseq-train exited with status {returncode} on rank {env.global_rank} ({env.hostname}); "
                "its output is above in this log"
            )
        return self.save_dir

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Run the same command after the requeue: fairseq-train resumes from ``checkpoint_last.pt``."""
        logger.info("requeued: the next start resumes from %s/checkpoint_last.pt", self.save_dir)
        return submitit.helpers.DelayedSubmission(self)
