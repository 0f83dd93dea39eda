"""A run killed at any moment, saves included, resumes with the same command (Slurm preemption requeues jobs)."""

import os
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch
from console import BIN, ENV, REPO, json_logs, random_letters_data_bin, run, train_command

import fairseq_expire_compat

UPDATES = 30


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    return random_letters_data_bin(tmp_path_factory.mktemp("kills"))


def saved_updates(path) -> int:
    return torch.load(path, weights_only=False)["optimizer_history"][-1]["num_updates"]


def test_a_copy_interrupted_midway_leaves_the_destination_as_it_was(tmp_path, monkeypatch):
    source, destination = tmp_path / "checkpoint_2_8.pt", tmp_path / "checkpoint_last.pt"
    source.write_bytes(b"new" * 1000)
    destination.write_bytes(b"old")

    def killed_halfway(src, dst):
        with open(dst, "wb") as half:
            half.write(open(src, "rb").read()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        fairseq_expire_compat._AtomicCopyPathManager(None).copy(str(source), str(destination), overwrite=True)
    assert destination.read_bytes() == b"old"


def test_a_torn_last_checkpoint_resumes_from_the_newest_intact_one(data_bin, tmp_path):
    save = tmp_path / "save"
    run("fairseq-train", *train_command(data_bin, save, "--save-interval-updates", 4, updates=12))
    newest = save / "checkpoint_1_12.pt"
    assert saved_updates(newest) == 12
    last = save / "checkpoint_last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # killed while copying
    (save / "checkpoint_last.pt.tmp").write_bytes(b"partial")
    os.utime(save / "checkpoint_1_8.pt", (time.time() - 60, time.time() - 60))

    resumed = run("fairseq-train", *train_command(data_bin, save, "--save-interval-updates", 4, updates=16))
    log = resumed.stdout + resumed.stderr
    # checkpoint_best.pt may be the newest file: the same save's copy of checkpoint_1_12.pt
    assert f"{last} is unreadable or missing (a save was interrupted): resuming from {save}" in log
    assert "removing" in log and not (save / "checkpoint_last.pt.tmp").exists()
    assert json_logs(log, "train_inner")[0]["num_updates"] in (15, "15")  # logged every 5 updates: from 12 on
    assert saved_updates(last) == 16


def test_a_run_resumed_at_its_max_update_trains_no_further(data_bin, tmp_path):
    """A job killed after its final save, then requeued: fairseq alone would train (and save) update N + 1."""
    save = tmp_path / "save"
    run("fairseq-train", *train_command(data_bin, save, "--save-interval-updates", 4, updates=8))
    again = run("fairseq-train", *train_command(data_bin, save, "--save-interval-updates", 4, updates=8))
    assert "the checkpoint is at update 8, --max-update 8: nothing to train" in again.stdout + again.stderr
    assert saved_updates(save / "checkpoint_last.pt") == 8


@pytest.mark.slow
def test_training_killed_at_random_moments_resumes_every_time_and_finishes(data_bin, tmp_path):
    """Ten SIGKILLs at random moments of a run that saves after every update, then the same command finishes.
    Each kill comes a random fraction of a second after the run's first save of its own, so that it falls while
    training or saving however fast the machine starts fairseq, and every run moves the checkpoint on."""
    save = tmp_path / "save"
    command = [
        str(BIN / "fairseq-train"),
        *map(str, train_command(data_bin, save, "--save-interval-updates", 1, updates=UPDATES)),
    ]
    rng = random.Random(0)
    kills = 0
    while kills < 10:
        process = subprocess.Popen(
            command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        output = []
        for line in process.stdout:
            output.append(line)
            if "Saved checkpoint" in line:
                break
        time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is not None:  # it finished (or failed) before the kill
            output.append(process.stdout.read())
            assert process.returncode == 0, "".join(output)[-3000:]
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        kills += 1
    finished = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert saved_updates(save / "checkpoint_last.pt") == UPDATES
    assert kills >= 5  # the loop did kill runs, not just finish one
