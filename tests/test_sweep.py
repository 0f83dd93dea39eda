"""scripts/sweep.py: grids, names, manifest and results table; a real job array on a local Slurm."""

import csv
import io
import json
import re
import time

import pytest
import torch
from console import json_logs
from slurm_cluster import REPO, local_slurm, run_script, tiny_data, tiny_training_args  # noqa: F401

from fairseq_expire.launch import LaunchError
from fairseq_expire.launch.fairseq_args import grid_point_args, with_json_logs
from fairseq_expire.launch.sweep import (
    expand,
    expand_job_ids,
    format_table,
    job_states,
    load_grid,
    parse_grid_items,
    parse_sacct_states,
    point_names,
    read_manifest,
    summarize_log,
)

TINY_GRID = REPO / "sweeps" / "tiny_cpu.yaml"


def test_grid_items_and_files_expand_to_every_combination(tmp_path):
    grid = parse_grid_items(["lr=1e-3,3e-3", "--expire_span_alpha=0,1e-6"])
    assert grid == {"lr": ["1e-3", "3e-3"], "expire-span-alpha": ["0", "1e-6"]}
    points = expand(grid)
    assert [tuple(p.values()) for p in points] == [
        ("1e-3", "0"),
        ("1e-3", "1e-6"),
        ("3e-3", "0"),
        ("3e-3", "1e-6"),
    ]
    assert point_names(points)[1] == "lr=1e-3_expire-span-alpha=1e-6"
    assert grid_point_args({"lr": "1e-3", "expire-span-noisy": True, "share-decoder-input-output-embed": False}) == [
        "--lr", "1e-3", "--expire-span-noisy"
    ]  # fmt: skip
    spec = load_grid([str(TINY_GRID)])
    assert (
        len(expand(spec.grid)) == 4
        and spec.launch["array_parallelism"] == 2
        and "--arch" in spec.fairseq_args
    )
    assert len(expand(load_grid([str(REPO / "sweeps" / "enwik8_alpha.yaml")]).grid)) == 6
    with pytest.raises(LaunchError, match="key=value1,value2"):
        parse_grid_items(["lr"])
    (tmp_path / "bad.yaml").write_text("grid: {lr: [1]}\nslurm: {nodes: 2}\n")
    with pytest.raises(LaunchError, match="unknown section"):
        load_grid([str(tmp_path / "bad.yaml")])
    with pytest.raises(LaunchError, match="share a save dir name"):
        point_names(expand({"data": ["a/b", "a-b"]}))


def test_array_ids_from_sacct():
    assert expand_job_ids("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]
    assert expand_job_ids("12_3") == ["12_3"] and expand_job_ids("13") == ["13"]


def test_an_elements_own_accounting_record_wins_over_the_arrays_pending_record():
    # as sacct listed a failed element and, after it, its array's pending rest, cancelled before Slurm split it off
    states = parse_sacct_states("12_0|FAILED\n12_[0-1%1]|CANCELLED by 0\n13|COMPLETED\n14_2|\n")
    assert states == {"12_0": "FAILED", "12_1": "CANCELLED", "13": "COMPLETED", "14_2": "UNKNOWN"}


def test_log_summary_and_tables():
    log = "\n".join(
        [
            '2024-01-01 | INFO | train_inner | {"num_updates": "5", "span_avg": "6.4", "mem_avg": "20"}',
            '2024-01-01 | INFO | valid | {"valid_nll_loss": "3.5", "valid_num_updates": "10"}',
            '2024-01-01 | INFO | train_inner | {"num_updates": "15", "span_avg": "6.1", "mem_avg": "19.5"}',
            '2024-01-01 | INFO | valid | {"valid_nll_loss": "3.25", "valid_num_updates": "20"}',
            '2024-01-01 | INFO | train | {"train_span_avg": "6", "train_mem_avg": "19", "train_num_updates": "20"}',
        ]
    )
    assert summarize_log(log) == {
        "best_valid_nll_loss": 3.25,
        "span_avg": 6.0,
        "mem_avg": 19.0,
        "updates": 20,
    }
    assert summarize_log("") == {
        "best_valid_nll_loss": None,
        "span_avg": None,
        "mem_avg": None,
        "updates": None,
    }
    rows = [
        {"job": "1_0", "lr": "1e-3", "state": "COMPLETED", "updates": 20},
        {"job": "1_1", "state": "FAILED"},
    ]
    markdown = format_table(rows, ["job", "lr", "state", "updates"])
    assert markdown.splitlines()[0] == "| job | lr | state | updates |"
    assert markdown.splitlines()[3] == "| 1_1 | - | FAILED | - |"
    assert list(csv.reader(io.StringIO(format_table(rows, ["job", "state"], "csv")))) == [
        ["job", "state"], ["1_0", "COMPLETED"], ["1_1", "FAILED"]
    ]  # fmt: skip


def test_states_without_slurm_accounting_come_from_submitits_result_files(tmp_path):
    from submitit.core.utils import cloudpickle_dump

    logs = tmp_path / "logs"
    logs.mkdir()
    cloudpickle_dump(("success", "/ckpt/a"), logs / "7_0_result.pkl")
    cloudpickle_dump(("error", "Traceback ..."), logs / "8_0_result.pkl")
    jobs = [{"job_id": job_id, "log": str(logs / f"{job_id}_0_log.out")} for job_id in ("7", "8", "9")]
    assert job_states({"executor": "local", "jobs": jobs}) == {
        "7": "COMPLETED", "8": "FAILED", "9": "RUNNING or KILLED"
    }  # fmt: skip
    with pytest.raises(LaunchError, match="no sweep in"):
        read_manifest(tmp_path)


def test_sweeps_log_json_for_collect():
    assert with_json_logs(["data"]) == ["data", "--log-format", "json"]
    assert with_json_logs(["data", "--log-format=json"]) == ["data", "--log-format=json"]
    with pytest.raises(LaunchError, match="sweeps log JSON"):
        with_json_logs(["data", "--log-format", "simple"])


# --- on the local Slurm -------------------------------------------------------------------------------------------


def slurm_job_count(cluster) -> int:
    listing = cluster.run("sacct", "-n", "-X", "-P", "--starttime", "2000-01-01", "--format", "JobID")
    return len(listing.stdout.split())


def test_unknown_grid_key_is_refused_before_anything_is_submitted(local_slurm, tiny_data, tmp_path):
    before = slurm_job_count(local_slurm)
    result = run_script("sweep.py", "--grid", "lr=1e-3,3e-3", "max-spam=64,128", "--save-dir", tmp_path / "sweep",
                        "--", *tiny_training_args(tiny_data), env=local_slurm.env)  # fmt: skip
    assert result.returncode == 2
    assert "grid key(s) max-spam: fairseq-train has no such option" in result.stderr
    assert "--max-span" in result.stderr and "Nothing was submitted" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "sweep").exists() and slurm_job_count(local_slurm) == before


@pytest.fixture(scope="module")
def finished_sweep(local_slurm, tiny_data, tmp_path_factory):
    """sweeps/tiny_cpu.yaml on the local Slurm: a 4-job array, at most 2 at a time, run to the end."""
    root = tmp_path_factory.mktemp("sweeps") / "tiny"
    result = run_script(
        "sweep.py", "--grid", TINY_GRID, "--save-dir", root, "--", tiny_data, env=local_slurm.env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((root / "sweep.json").read_text())
    array_ids = {job["job_id"].split("_")[0] for job in manifest["jobs"]}
    assert len(manifest["jobs"]) == 4 and len(array_ids) == 1, "one Slurm job array"
    for job in manifest["jobs"]:
        local_slurm.wait_job(job["job_id"], timeout=300)
    return root, manifest


@pytest.mark.slow
def test_a_four_job_array_completes_and_collect_reports_its_results(finished_sweep, local_slurm):
    root, manifest = finished_sweep
    status = run_script("sweep.py", "status", root, env=local_slurm.env)
    assert status.returncode == 0 and status.stdout.count("COMPLETED") == 4, status.stdout + status.stderr

    result = run_script("sweep.py", "collect", root, "--format", "csv", env=local_slurm.env)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["job"] for row in rows] == [job["job_id"] for job in manifest["jobs"]]
    seen = set()
    for row, job in zip(rows, manifest["jobs"]):
        save_dir = root / job["name"]
        assert (
            job["save_dir"] == str(save_dir)
            and job["name"] == f"lr={row['lr']}_expire-span-alpha={row['expire-span-alpha']}"
        )
        checkpoint = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
        assert checkpoint["cfg"]["optimization"]["lr"] == [
            float(row["lr"])
        ]  # this job's own hyper-parameters
        assert checkpoint["cfg"]["criterion"]["expire_span_alpha"] == float(row["expire-span-alpha"])
        assert row["state"] == "COMPLETED"
        assert int(row["updates"]) == checkpoint["optimizer_history"][-1]["num_updates"] == 20
        assert float(row["best_valid_nll_loss"]) == pytest.approx(checkpoint["extra_state"]["best"], abs=1e-3)
        log = (root / "logs" / f"{job['job_id']}_0_log.out").read_text()
        assert row["log"] == job["log"] == str(root / "logs" / f"{job['job_id']}_0_log.out")
        last = json_logs(log, "train")[-1]  # the run ends with its end-of-epoch summary
        assert float(row["span_avg"]) == pytest.approx(float(last["train_span_avg"]))
        assert float(row["mem_avg"]) == pytest.approx(float(last["train_mem_avg"]))
        seen.add((row["lr"], row["expire-span-alpha"]))
    assert len(seen) == 4

    markdown = run_script(
        "sweep.py", "collect", root, "--output", root / "results.md", env=local_slurm.env
    ).stdout
    assert markdown.splitlines()[0].startswith(
        "| job | lr | expire-span-alpha | state | best_valid_nll_loss |"
    )
    assert (root / "results.md").read_text() == markdown


def test_a_save_dir_used_by_another_sweep_is_refused(finished_sweep, local_slurm, tiny_data):
    root, manifest = finished_sweep
    result = run_script("sweep.py", "--grid", "lr=1e-2", "--save-dir", root, "--",
                        *tiny_training_args(tiny_data), env=local_slurm.env)  # fmt: skip
    assert result.returncode == 2 and "is already used by sweep 'tiny'" in result.stderr
    assert "choose another --save-dir" in result.stderr and "Traceback" not in result.stderr
    assert json.loads((root / "sweep.json").read_text()) == manifest


@pytest.mark.slow
def test_failed_and_cancelled_jobs_are_reported_as_such_with_their_logs(local_slurm, tiny_data, tmp_path):
    """--max-span 8 < --tokens-per-sample 16 passes fairseq's parser but the model refuses it when built."""
    root = tmp_path / "failing"
    result = run_script(
        "sweep.py", "--grid", "max-span=8,64", "--array-parallelism", 1, "--cpu", "--time", 10, "--save-dir", root,
        "--", *tiny_training_args(tiny_data), env=local_slurm.env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    failing, cancelled = json.loads((root / "sweep.json").read_text())["jobs"]
    # Cancel the second job while it waits for the first (--array-parallelism 1). Not before the first has
    # started: Slurm 22.05 keeps no accounting record of an array element cancelled before any element ran.
    deadline = time.monotonic() + 120
    while local_slurm.job_state(failing["job_id"]) in ("UNKNOWN", "PENDING"):
        assert time.monotonic() < deadline, local_slurm.diagnostics()
        time.sleep(0.3)
    local_slurm.run("scancel", cancelled["job_id"])
    assert local_slurm.wait_job(failing["job_id"], timeout=180) == "FAILED"
    assert local_slurm.wait_job(cancelled["job_id"], timeout=60) == "CANCELLED"

    for command in ("status", "collect"):
        table = run_script("sweep.py", command, root, env=local_slurm.env).stdout
        rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
        assert "| FAILED |" in rows[failing["job_id"]] and failing["log"] in rows[failing["job_id"]], table
        assert "| CANCELLED |" in rows[cancelled["job_id"]], table
    assert re.search(r"--tokens-per-sample 16 is longer than --max-span 8", open(failing["log"]).read())
