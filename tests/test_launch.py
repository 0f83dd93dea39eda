"""scripts/launch.py: checks before submitting, and real runs on a local Slurm (2 nodes x 2 CPU tasks, requeue)."""

import os
import re
import sys
import time
from pathlib import Path

import pytest
from console import json_logs
from slurm_cluster import (  # noqa: F401
    local_slurm,
    require_slurm_programs,
    run_script,
    tiny_data,
    tiny_training_args,
)

from fairseq_expire.launch import LaunchError
from fairseq_expire.launch.executors import parse_time_minutes, resources_from
from fairseq_expire.launch.fairseq_args import check_not_launcher_options, parse_train_args
from fairseq_expire.launch.train_job import TrainJob, distributed_args


def test_slurm_time_formats_in_minutes():
    assert parse_time_minutes("90") == 90
    assert parse_time_minutes("30:30") == 31
    assert parse_time_minutes("72:00:00") == 72 * 60
    assert parse_time_minutes("1-12") == 36 * 60
    assert parse_time_minutes("2-00:30:00") == 48 * 60 + 30
    with pytest.raises(LaunchError, match="not a Slurm time"):
        parse_time_minutes("3 days")


def test_one_task_per_gpu_and_cpu_processes_on_request():
    gpu = resources_from({"nodes": 4, "gpus_per_node": 8})
    assert (gpu.num_tasks, gpu.tasks_per_node, gpu.gpus_per_node, gpu.cpu) == (32, 8, 8, False)
    cpu = resources_from({"nodes": 2, "cpu": True, "tasks_per_node": 2})
    assert (cpu.num_tasks, cpu.gpus_per_node) == (4, 0)
    with pytest.raises(LaunchError, match="--tasks-per-node is for --cpu"):
        resources_from({"tasks_per_node": 2})
    with pytest.raises(LaunchError, match="drop --gpus-per-node"):
        resources_from({"cpu": True, "gpus_per_node": 2})
    with pytest.raises(LaunchError, match="Slurm memory size"):
        resources_from({"mem": "lots"})


def test_each_task_gets_its_rank_and_the_first_node_as_rendezvous():
    job = TrainJob(["data", "--arch", "expire_span_lm_tiny"], "/ckpt", cpu=True)
    command = job.command(num_tasks=4, rank=3, local_rank=1, master="node7", job_id="1234")
    assert command[0].endswith("fairseq-train") and command[1:4] == ["data", "--arch", "expire_span_lm_tiny"]
    text = " ".join(command)
    assert "--save-dir /ckpt" in text and "--cpu" in text
    assert (
        "--distributed-world-size 4 --distributed-rank 3 --distributed-init-method tcp://node7:11234" in text
    )
    assert "--distributed-no-spawn --device-id 1 --distributed-backend gloo --ddp-backend legacy_ddp" in text
    assert distributed_args(1, 0, 0, "node7", 10000, cpu=True) == []  # a single task is not distributed
    gpu = " ".join(distributed_args(8, 5, 5, "node1", 12345, cpu=False))
    assert "gloo" not in gpu and "--device-id 5" in gpu


# --- bad input: clear errors, nothing submitted -------------------------------------------------------------------


def no_controller_env(tmp_path) -> dict:
    """A slurm.conf whose controller does not run (nothing listens on its port)."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "ClusterName=nowhere\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\n"
        "NodeName=localhost CPUs=1 State=UNKNOWN\nPartitionName=debug Nodes=ALL Default=YES\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    return {
        **env,
        "SLURM_CONF": str(conf),
        "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
    }


def test_no_controller_is_an_error_not_a_run_on_the_login_node(tiny_data, tmp_path):
    require_slurm_programs()  # srun on PATH: submitit's AutoExecutor would pick Slurm here
    result = run_script("launch.py", "--save-dir", tmp_path / "ckpt", "--", *tiny_training_args(tiny_data),
                        env=no_controller_env(tmp_path))  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no Slurm controller answers" in result.stderr and "--executor local" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ckpt").exists()


def test_without_slurm_commands_the_error_says_so(tiny_data, tmp_path):
    env = {**no_controller_env(tmp_path), "PATH": str(Path(sys.executable).parent)}
    result = run_script(
        "launch.py", "--save-dir", tmp_path / "ckpt", "--", *tiny_training_args(tiny_data), env=env
    )
    assert result.returncode == 2
    assert "not on PATH" in result.stderr and "Traceback" not in result.stderr


def test_fairseq_arguments_are_checked_with_fairseqs_parser(tiny_data, tmp_path):
    args = tiny_training_args(tiny_data)
    assert parse_train_args(args).namespace.arch == "expire_span_lm_tiny"
    cases = {
        (
            "--max-spam",
            "64",
        ): "fairseq-train does not know --max-spam 64 for --task language_modeling_with_memory",
        ("--lr", "fast"): "fairseq-train rejects the arguments: argument --lr: invalid",
        ("--criterion", "cross_entropy"): "cannot train with --criterion cross_entropy",
    }
    for extra, message in cases.items():
        with pytest.raises(LaunchError, match=re.escape(message)):
            parse_train_args(args + list(extra))
    with pytest.raises(LaunchError, match=re.escape("did you mean: --max-spam -> --max-span")):
        parse_train_args(args + ["--max-spam", "64"])
    with pytest.raises(LaunchError, match="data directory .* does not exist"):
        parse_train_args([str(tmp_path / "no-data"), *args[1:]])
    short = [str(tiny_data), "--user-dir", "fairseq_expire", "--arch", "expire_span_lm_tiny", "--cpu"]
    completed = parse_train_args(short).namespace  # the card's short form, completed as fairseq-train does
    assert (completed.task, completed.criterion) == (
        "language_modeling_with_memory",
        "expire_span_cross_entropy",
    )
    full = [*short, "--task", "language_modeling_with_memory", "--criterion", "expire_span_cross_entropy"]
    with pytest.raises(LaunchError, match="--batch-size N is required"):
        parse_train_args(full)
    with pytest.raises(LaunchError, match="--distributed-world-size .the launcher sets it"):
        check_not_launcher_options(args + ["--distributed-world-size", "8"], cpu=True)
    with pytest.raises(LaunchError, match="--ddp-backend .CPU runs use legacy_ddp"):
        check_not_launcher_options(args + ["--ddp-backend=c10d"], cpu=True)
    with pytest.raises(LaunchError, match="give --save-dir to the launcher"):
        check_not_launcher_options(args + ["--save-dir", "elsewhere"], cpu=False)


def test_bad_fairseq_arguments_stop_the_launcher_before_anything_runs(tiny_data, tmp_path):
    result = run_script("launch.py", "--executor", "local", "--save-dir", tmp_path / "ckpt", "--",
                        *tiny_training_args(tiny_data), "--max-spam", "64", env=no_controller_env(tmp_path))  # fmt: skip
    assert result.returncode == 2 and "fairseq-train does not know --max-spam 64" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "ckpt").exists()
    no_arch = run_script("launch.py", "--executor", "local", "--save-dir", tmp_path / "ckpt", "--", tiny_data,
                         "--user-dir", "fairseq_expire", env=no_controller_env(tmp_path))  # fmt: skip
    assert no_arch.returncode == 2 and "no model for --arch (not given)" in no_arch.stderr, no_arch.stderr


def test_unknown_partition_and_sbatch_refusals_are_clear_errors(local_slurm, tiny_data, tmp_path):
    result = run_script("launch.py", "--partition", "gpu-big", "--save-dir", tmp_path / "ckpt", "--",
                        *tiny_training_args(tiny_data), env=local_slurm.env)  # fmt: skip
    assert result.returncode == 2 and "Slurm partition 'gpu-big' does not exist" in result.stderr
    assert f"this cluster has: {local_slurm.partition}" in result.stderr and "Traceback" not in result.stderr
    refused = run_script("launch.py", "--constraint", "volta32gb", "--save-dir", tmp_path / "ckpt", "--",
                         *tiny_training_args(tiny_data), env=local_slurm.env)  # fmt: skip
    assert refused.returncode == 1 and "submission failed" in refused.stderr, refused.stderr
    assert "Invalid feature specification" in refused.stderr and "Traceback" not in refused.stderr


# --- real runs ----------------------------------------------------------------------------------------------------


def submitted_job_id(result) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return re.search(r"Submitted job (\S+)", result.stdout).group(1)


@pytest.mark.slow
def test_two_nodes_two_cpu_tasks_each_train_as_world_size_4(local_slurm, tiny_data, tmp_path):
    save_dir = tmp_path / "ckpt"
    result = run_script(
        "launch.py", "--nodes", 2, "--cpu", "--tasks-per-node", 2, "--time", 10, "--save-dir", save_dir, "--",
        *tiny_training_args(tiny_data, 20, "--validate-interval-updates", 10), env=local_slurm.env,
    )  # fmt: skip
    job_id = submitted_job_id(result)
    assert f"{save_dir}" in result.stdout and f"{save_dir}/logs/{job_id}_0_log.out" in result.stdout
    assert local_slurm.wait_job(job_id, timeout=240) == "COMPLETED", local_slurm.diagnostics()

    logs = {rank: (save_dir / "logs" / f"{job_id}_{rank}_log.out").read_text() for rank in range(4)}
    nodes = {re.search(r"task \d of 4 \(node (\d) of 2", log).group(1) for log in logs.values()}
    assert nodes == {"0", "1"}, "the four tasks must span both nodes"
    for rank, log in logs.items():
        assert f"distributed init (rank {rank})" in log
    assert "training on 4 devices" in logs[0]
    updates = [int(record["num_updates"]) for record in json_logs(logs[0], "train_inner")]
    assert updates and max(updates) == 20, "the run must actually train"
    assert json_logs(logs[0], "valid")
    assert (save_dir / "checkpoint_last.pt").exists() and (save_dir / "checkpoint_best.pt").exists()
    allocation = local_slurm.run(
        "sacct", "-n", "-P", "-X", "-j", job_id, "--format", "NNodes,NTasks,NodeList"
    )
    assert allocation.stdout.split("|")[0] == "2"


@pytest.mark.slow
def test_a_preempted_run_is_requeued_and_resumes_from_its_last_checkpoint(local_slurm, tiny_data, tmp_path):
    """submitit's preemption signal (what Slurm sends before a timeout or preemption) mid-run: the job requeues
    itself, starts again, and fairseq-train resumes from checkpoint_last.pt to finish all updates."""
    save_dir, updates = tmp_path / "ckpt", 200
    result = run_script(
        "launch.py", "--cpu", "--tasks-per-node", 2, "--time", 60, "--save-dir", save_dir, "--",
        *tiny_training_args(tiny_data, updates, "--save-interval-updates", 10, "--keep-interval-updates", 1,
                            "--no-epoch-checkpoints", "--disable-validation"),
        env=local_slurm.env,
    )  # fmt: skip
    job_id = submitted_job_id(result)
    deadline = time.monotonic() + 120
    while not (save_dir / "checkpoint_last.pt").exists():
        assert time.monotonic() < deadline, local_slurm.diagnostics()
        time.sleep(0.2)
    # What submitit's SlurmJob._interrupt() does, and Slurm before a preemption: SIGTERM, then the USR2 signal
    local_slurm.run("scancel", "--signal", "SIGTERM", job_id)
    local_slurm.run("scancel", "--signal", "USR2", job_id)
    assert local_slurm.wait_job(job_id, timeout=300) == "COMPLETED", local_slurm.diagnostics()

    log = (save_dir / "logs" / f"{job_id}_0_log.out").read_text()
    assert log.count("Starting with JobEnvironment") == 2, "the job ran twice: before and after the requeue"
    assert "this job is preempted" in log
    loaded = re.findall(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ (\d+) updates\)", log)
    assert len(loaded) == 1 and 0 < int(loaded[0]) < updates, log[-3000:]
    resumed = [int(r["num_updates"]) for r in json_logs(log.split("Loaded checkpoint", 1)[1], "train_inner")]
    assert resumed[0] > int(loaded[0]) and max(resumed) == updates
    requeues = local_slurm.run("sacct", "-n", "-P", "-X", "--duplicates", "-j", job_id, "--format", "State")
    assert requeues.stdout.split() == ["REQUEUED", "COMPLETED"]


@pytest.mark.slow
def test_the_local_executor_runs_two_cpu_processes_on_this_machine(tiny_data, tmp_path):
    """--executor local, on request only: submitit subprocesses here, same ranks and rendezvous as on Slurm."""
    save_dir = tmp_path / "ckpt"
    result = run_script("launch.py", "--executor", "local", "--cpu", "--tasks-per-node", 2, "--save-dir", save_dir,
                        "--", *tiny_training_args(tiny_data, 10), env=no_controller_env(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "finished" in result.stdout
    log = next((save_dir / "logs").glob("*_0_log.out")).read_text()
    assert "training on 2 devices" in log
    assert max(int(record["num_updates"]) for record in json_logs(log, "train_inner")) == 10
    assert (save_dir / "checkpoint_last.pt").exists()
