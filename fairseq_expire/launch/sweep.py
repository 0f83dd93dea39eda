"""Grid sweeps: the grid, one save dir per grid point named from its hyper-parameters, the manifest of all jobs,
their states from Slurm accounting, and the results table read from each job's fairseq log.
"""

import csv
import hashlib
import io
import itertools
import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from fairseq_expire.launch import LaunchError
from fairseq_expire.launch.fairseq_args import normalize_key

MANIFEST = "sweep.json"
GRID_FILE_KEYS = ("grid", "fairseq", "launch")
RESULT_COLUMNS = ("state", "best_valid_nll_loss", "span_avg", "mem_avg", "updates", "log")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


@dataclass
class GridSpec:
    """A sweep as written: the grid, fixed fairseq-train arguments, launcher options (all optional but the grid)."""

    grid: Dict[str, List[object]]
    fairseq_args: List[str] = field(default_factory=list)
    launch: Dict[str, object] = field(default_factory=dict)
    path: Optional[Path] = None  # the grid file, if the sweep came from one


def parse_grid_items(items: Sequence[str]) -> Dict[str, List[str]]:
    """``["lr=1e-3,3e-3", "max-span=64"]`` -> ``{"lr": ["1e-3", "3e-3"], "max-span": ["64"]}``."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise LaunchError(f"--grid {item!r}: write key=value1,value2,... (or give one YAML grid file)")
        grid[normalize_key(key)] = [value.strip() for value in values.split(",")]
    return grid


def load_grid_file(path: Path) -> GridSpec:
    """A YAML grid file: ``grid`` (option -> list of values), optional ``fairseq`` (fixed fairseq-train
    arguments, a list or one string) and ``launch`` (launcher options, e.g. ``nodes``, ``partition``, ``save_dir``).
    """
    try:
        content = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise LaunchError(f"cannot read grid file {path}: {error}") from None
    if not isinstance(content, dict) or not isinstance(content.get("grid"), dict) or not content["grid"]:
        raise LaunchError(
            f"grid file {path} needs a `grid:` mapping of fairseq-train options to lists of values"
        )
    unknown = sorted(set(content) - set(GRID_FILE_KEYS))
    if unknown:
        raise LaunchError(
            f"grid file {path}: unknown section(s) {', '.join(unknown)} (known: {', '.join(GRID_FILE_KEYS)})"
        )
    grid = {}
    for key, values in content["grid"].items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise LaunchError(f"grid file {path}: grid key {key!r} has no values")
        grid[normalize_key(key)] = values
    fairseq = content.get("fairseq") or []
    fairseq = shlex.split(fairseq) if isinstance(fairseq, str) else [str(arg) for arg in fairseq]
    launch = content.get("launch") or {}
    if not isinstance(launch, dict):
        raise LaunchError(f"grid file {path}: `launch:` must be a mapping of launcher options")
    return GridSpec(
        grid, fairseq, {key.replace("-", "_"): value for key, value in launch.items()}, Path(path)
    )


def load_grid(specs: Sequence[str]) -> GridSpec:
    """``--grid`` as given: one YAML file, or ``key=v1,v2`` items."""
    if len(specs) == 1 and (specs[0].endswith((".yaml", ".yml")) or Path(specs[0]).is_file()):
        return load_grid_file(Path(specs[0]))
    return GridSpec(parse_grid_items(specs))


def expand(grid: Dict[str, List[object]]) -> List[Dict[str, object]]:
    """Every combination, the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[key] for key in keys))]


def point_name(params: Dict[str, object]) -> str:
    """A directory name from the hyper-parameters, e.g. ``expire-span-alpha=1e-6_lr=7e-4``."""
    name = "_".join(
        f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in params.items()
    )
    name = _UNSAFE.sub("-", name) or "default"
    if len(name) > 150:
        name = f"{name[:140]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def point_names(points: List[Dict[str, object]]) -> List[str]:
    names = [point_name(point) for point in points]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise LaunchError(
            f"grid points share a save dir name ({', '.join(duplicates)}): remove repeated values"
        )
    return names


# --- the manifest --------------------------------------------------------------------------------------------------


def check_save_root(root: Path) -> None:
    """A sweep's directory must not hold another sweep, nor checkpoints of another run."""
    manifest = root / MANIFEST
    if manifest.exists():
        other = read_manifest(root)
        raise LaunchError(
            f"{root} is already used by sweep {other.get('name')!r} (submitted {other.get('submitted')}, "
            f"manifest {manifest}): choose another --save-dir, or delete that sweep's directory first"
        )
    checkpoints = sorted(root.rglob("checkpoint*.pt")) if root.is_dir() else []
    if checkpoints:
        raise LaunchError(
            f"{root} already holds checkpoints of another run ({checkpoints[0]}): choose another --save-dir"
        )


def write_manifest(root: Path, manifest: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / MANIFEST
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    temporary.replace(path)
    return path


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LaunchError(
            f"no sweep in {root}: {MANIFEST} is missing (give the --save-dir of a sweep)"
        ) from None
    except json.JSONDecodeError as error:
        raise LaunchError(f"{path} is damaged: {error}") from None


# --- job states ----------------------------------------------------------------------------------------------------


def expand_job_ids(job_id: str) -> List[str]:
    """sacct's ``123_[0-2,5%2]`` (pending array elements) -> ``123_0 123_1 123_2 123_5``."""
    match = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not match:
        return [job_id]
    base, ranges = match.group(1), match.group(2).split("%")[0]
    ids = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        ids += [f"{base}_{index}" for index in range(int(low), int(high or low) + 1)]
    return ids


def slurm_states(job_ids: Sequence[str]) -> Optional[Dict[str, str]]:
    """Each job's state from Slurm accounting (COMPLETED, FAILED, CANCELLED, RUNNING...); None without it."""
    bases = sorted({job_id.split("_")[0] for job_id in job_ids})
    try:
        result = subprocess.run(
            [
                "sacct",
                "--noheader",
                "--parsable2",
                "--allocations",
                "--jobs",
                ",".join(bases),
                "--format",
                "JobID,State",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return parse_sacct_states(result.stdout)


def parse_sacct_states(text: str) -> Dict[str, str]:
    """``JobID|State`` lines -> {job id: state}. An element's own record (``123_4``) wins over a bracketed record
    of the array's elements not yet split off (``123_[0-5]``), which accounting may list after it."""
    own, pending = {}, {}
    for line in text.splitlines():
        job_id, _, state = line.strip().partition("|")
        ids = expand_job_ids(job_id)
        record = own if ids == [job_id] else pending
        for single in ids:
            record[single] = state.split()[0] if state.strip() else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
    return {**pending, **own}


def _submitit_outcome(log_dir: Path, job_id: str) -> Optional[str]:
    """COMPLETED or FAILED from the result file submitit writes when the job's function returns or raises."""
    from submitit.core.utils import JobPaths, pickle_load

    result = JobPaths(log_dir, job_id, task_id=0).result_pickle
    if not result.exists():
        return None
    return "COMPLETED" if pickle_load(result)[0] == "success" else "FAILED"


def job_states(manifest: dict) -> Dict[str, str]:
    """The state of every job of a sweep: Slurm accounting's, else what submitit's result files tell."""
    jobs = manifest["jobs"]
    on_slurm = manifest.get("executor") == "slurm"
    states = slurm_states([job["job_id"] for job in jobs]) if on_slurm else None
    if states is not None:
        return {job["job_id"]: states.get(job["job_id"], "UNKNOWN") for job in jobs}
    unknown = "UNKNOWN (no Slurm accounting)" if on_slurm else "RUNNING or KILLED"
    return {
        job["job_id"]: _submitit_outcome(Path(job["log"]).parent, job["job_id"]) or unknown for job in jobs
    }


# --- results -------------------------------------------------------------------------------------------------------


_RECORD = re.compile(r"\| (train_inner|train|valid) \| (\{.*\})\s*$")


def log_records(text: str) -> List[Tuple[str, dict]]:
    """The ``--log-format json`` records (train_inner, train, valid) of fairseq's output, in order."""
    return [
        (match.group(1), json.loads(match.group(2)))
        for match in map(_RECORD.search, text.splitlines())
        if match
    ]


def summarize_log(text: str) -> Dict[str, Optional[float]]:
    """Best valid nll_loss, the latest span_avg and mem_avg, and the number of updates in a run's log.

    ``train`` (end of epoch) and ``train_inner`` records both count, whichever came last; a requeued run appends
    to the same log, so the latest records are those of the latest start.
    """
    losses, updates, latest = [], None, {}
    for tag, record in log_records(text):
        prefix = "" if tag == "train_inner" else f"{tag}_"
        if f"{prefix}num_updates" in record:
            updates = max(updates or 0, int(float(record[f"{prefix}num_updates"])))
        if tag == "valid" and "valid_nll_loss" in record:
            losses.append(float(record["valid_nll_loss"]))
        elif tag != "valid" and f"{prefix}span_avg" in record:
            latest = {
                key: float(record[f"{prefix}{key}"])
                for key in ("span_avg", "mem_avg")
                if f"{prefix}{key}" in record
            }
    return {
        "best_valid_nll_loss": min(losses) if losses else None,
        "span_avg": latest.get("span_avg"),
        "mem_avg": latest.get("mem_avg"),
        "updates": updates,
    }


def collect(manifest: dict) -> List[Dict[str, object]]:
    """One row per job: its hyper-parameters, state, results and log."""
    states = job_states(manifest)
    rows = []
    for job in manifest["jobs"]:
        log = Path(job["log"])
        text = log.read_text(errors="replace") if log.exists() else ""
        rows.append({"job": job["job_id"], **job["params"], "state": states[job["job_id"]], **summarize_log(text),
                     "log": str(log)})  # fmt: skip
    return rows


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_table(rows: List[Dict[str, object]], columns: Sequence[str], fmt: str = "markdown") -> str:
    """Rows as a Markdown table or CSV."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[("" if row.get(c) is None else row.get(c)) for c in columns] for row in rows])
        return out.getvalue()
    if fmt != "markdown":
        raise LaunchError(f"unknown table format {fmt!r}: markdown or csv")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += [
        "| " + " | ".join(_cell(row.get(column)).replace("|", "\\|") for column in columns) + " |"
        for row in rows
    ]
    return "\n".join(lines) + "\n"
