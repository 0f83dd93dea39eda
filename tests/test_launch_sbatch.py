"""The plain sbatch scripts in slurm/ on a real local Slurm: 2-node training, an array sweep, evaluation.

The scripts ask for GPUs; these runs override their resources on the sbatch command line (command-line options
win over #SBATCH lines) and add fairseq's CPU options, as a CPU-only cluster's user would.
"""

import re

import pytest
import torch
from console import json_logs
from slurm_cluster import REPO, local_slurm, tiny_data  # noqa: F401

pytestmark = pytest.mark.slow

CPU_RESOURCES = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
TINY = ["--arch", "expire_span_lm_tiny", "--tokens-per-sample", "16", "--batch-size", "2", "--lr", "0.003",
        "--max-update", "20", "--log-interval", "5", "--cpu", "--num-workers", "0"]  # fmt: skip
CPU_DISTRIBUTED = ["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]


def sbatch(cluster, *args) -> str:
    result = cluster.run("sbatch", "--parsable", *map(str, args))
    return result.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def two_node_run(local_slurm, tiny_data, tmp_path_factory):
    """slurm/train.sbatch on 2 nodes x 2 tasks."""
    out = tmp_path_factory.mktemp("train_sbatch")
    job_id = sbatch(
        local_slurm, "--nodes=2", "--ntasks-per-node=2", *CPU_RESOURCES, f"--output={out}/%x-%j.out",
        REPO / "slurm" / "train.sbatch", tiny_data, out / "ckpt", *TINY, *CPU_DISTRIBUTED,
    )  # fmt: skip
    state = local_slurm.wait_job(job_id, timeout=240)
    return job_id, state, out


def test_train_sbatch_trains_on_two_nodes_with_fairseqs_slurm_init(two_node_run, local_slurm):
    job_id, state, out = two_node_run
    log = (out / f"expire-span-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    for rank in range(4):
        assert f"distributed init (rank {rank}): tcp://" in log
    assert "training on 4 devices" in log
    assert max(int(r["num_updates"]) for r in json_logs(log, "train_inner")) == 20
    checkpoint = torch.load(out / "ckpt" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert checkpoint["optimizer_history"][-1]["num_updates"] == 20
    assert checkpoint["cfg"]["distributed_training"]["distributed_world_size"] == 4
    allocation = local_slurm.run("sacct", "-n", "-P", "-X", "-j", job_id, "--format", "NNodes")
    assert allocation.stdout.strip() == "2"


def test_eval_sbatch_scores_the_trained_checkpoint(two_node_run, local_slurm, tiny_data, tmp_path):
    _, _, out = two_node_run
    job_id = sbatch(
        local_slurm, *CPU_RESOURCES, f"--output={tmp_path}/%x-%j.out", REPO / "slurm" / "eval.sbatch",
        tiny_data, out / "ckpt" / "checkpoint_last.pt", "--cpu", "--tokens-per-sample", 16, "--gen-subset", "valid",
    )  # fmt: skip
    state = local_slurm.wait_job(job_id, timeout=120)
    log = (tmp_path / f"expire-eval-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    tokens = re.search(r"Evaluated ([\d,]+) tokens", log)
    loss = re.search(r"Loss \(base 2\): ([\d.]+)", log)
    assert tokens and int(tokens.group(1).replace(",", "")) > 0
    assert loss and 0 < float(loss.group(1)) < 5


def test_sweep_array_sbatch_runs_one_grid_line_per_array_task(local_slurm, tiny_data, tmp_path):
    grid = REPO / "slurm" / "grid_example.txt"
    lines = grid.read_text().splitlines()[:2]
    job_id = sbatch(
        local_slurm, "--array=0-1", *CPU_RESOURCES, f"--output={tmp_path}/%x-%A_%a.out",
        REPO / "slurm" / "sweep_array.sbatch", grid, tiny_data, tmp_path / "sweep", *TINY,
    )  # fmt: skip
    for index, line in enumerate(lines):
        state = local_slurm.wait_job(f"{job_id}_{index}", timeout=240)
        log = (tmp_path / f"expire-sweep-{job_id}_{index}.out").read_text()
        assert state == "COMPLETED", log[-3000:]
        alpha, lr = re.fullmatch(r"--expire-span-alpha (\S+) --lr (\S+)", line).groups()
        save_dir = tmp_path / "sweep" / f"expire-span-alpha={alpha}_lr={lr}"
        checkpoint = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
        assert checkpoint["cfg"]["optimization"]["lr"] == [float(lr)]  # the grid line wins over the recipe
        assert checkpoint["cfg"]["criterion"]["expire_span_alpha"] == float(alpha)
        assert checkpoint["optimizer_history"][-1]["num_updates"] == 20
