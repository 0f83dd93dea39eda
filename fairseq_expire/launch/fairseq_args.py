"""fairseq-train arguments checked with fairseq's own parser before anything is submitted.

A typo in a grid key or a missing data directory should cost seconds on the login node, not a queue wait and a
job that dies on start. Distributed options belong to the launcher, which sets them per task.
"""

import argparse
import contextlib
import difflib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import fairseq_expire
from fairseq_expire.errors import UsageError
from fairseq_expire.launch import LaunchError
from fairseq_expire.usage import complete_training_command

# Set by the launcher for every task; a user value would be overwritten or would contradict it.
LAUNCHER_OPTIONS = {
    "--save-dir": "give --save-dir to the launcher, before `--`",
    "--distributed-world-size": "the launcher sets it to nodes x tasks per node",
    "--distributed-rank": "the launcher sets it per task",
    "--distributed-init-method": "the launcher sets it from the job's first node",
    "--distributed-port": "the launcher picks the port (--master-port to choose it)",
    "--distributed-no-spawn": "the launcher starts one process per task itself",
    "--device-id": "the launcher sets it to the task's local rank",
    "--nprocs-per-node": "the launcher starts one process per task itself",
}
# On CPU only this pair works for several processes (see DESIGN section 3); the launcher sets it.
CPU_LAUNCHER_OPTIONS = {
    "--distributed-backend": "CPU runs use gloo, set by the launcher",
    "--ddp-backend": "CPU runs use legacy_ddp, set by the launcher",
}


@dataclass
class TrainArguments:
    """A checked fairseq-train argument list and what fairseq made of it."""

    namespace: argparse.Namespace
    # every option string fairseq-train accepts with this task, arch, criterion, optimizer...
    options: frozenset

    def describe(self) -> str:
        names = ("task", "arch", "criterion")
        return " ".join(f"--{name} {getattr(self.namespace, name, None)}" for name in names)


def option_names(args: Sequence[str]) -> List[str]:
    """The ``--options`` in an argument list, ``--name=value`` included."""
    return [arg.split("=", 1)[0] for arg in args if arg.startswith("--")]


def check_not_launcher_options(args: Sequence[str], cpu: bool) -> None:
    reserved = {**LAUNCHER_OPTIONS, **(CPU_LAUNCHER_OPTIONS if cpu else {})}
    clashes = [f"{name} ({reserved[name]})" for name in option_names(args) if name in reserved]
    if clashes:
        raise LaunchError("remove from the fairseq-train arguments: " + "; ".join(clashes))


def with_user_dir(args: Sequence[str]) -> List[str]:
    """``args`` with ``--user-dir`` pointing at this plugin when none is given: the job must load the models."""
    if "--user-dir" in option_names(args):
        return list(args)
    return [*args, "--user-dir", str(Path(fairseq_expire.__file__).parent)]


def option_value(args: Sequence[str], name: str) -> Optional[str]:
    """The value of the last ``name VALUE`` or ``name=VALUE`` in ``args`` (argparse's last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(f"{name}="):
            value = arg.split("=", 1)[1]
    return value


def with_json_logs(args: Sequence[str]) -> List[str]:
    """``args`` logging fairseq's JSON records, which ``sweep.py collect`` reads."""
    log_format = option_value(args, "--log-format")
    if log_format is None:
        return [*args, "--log-format", "json"]
    if log_format != "json":
        raise LaunchError(
            f"--log-format {log_format}: sweeps log JSON, which `sweep.py collect` reads; drop it"
        )
    return list(args)


def _register_this_plugin() -> None:
    """Import every module of this plugin's tasks/ and models/, as fairseq's ``--user-dir`` import does."""
    from fairseq.models import import_models
    from fairseq.tasks import import_tasks

    package = Path(fairseq_expire.__file__).parent
    import_tasks(str(package / "tasks"), "fairseq_expire.tasks")
    import_models(str(package / "models"), "fairseq_expire.models")


def _without_this_plugin(args: Sequence[str]) -> List[str]:
    """Drop ``--user-dir .../fairseq_expire``: this process has the plugin registered already (the installed
    copy), and fairseq refuses to import a second module of the same name from another path."""
    _register_this_plugin()
    kept, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == "--user-dir" and i + 1 < len(args) and Path(args[i + 1]).name == "fairseq_expire":
            skip = True
            continue
        if arg.startswith("--user-dir=") and Path(arg.split("=", 1)[1]).name == "fairseq_expire":
            continue
        kept.append(arg)
    return kept


def parse_train_args(args: Sequence[str], context: str = "", grid_keys: Sequence[str] = ()) -> TrainArguments:
    """Parse ``args`` as fairseq-train does (model, task and criterion options included), raising
    :class:`LaunchError` with fairseq's own message instead of exiting.

    ``grid_keys`` (options a sweep varies) are checked first, so an unknown one is reported as a grid key.
    """
    from fairseq import options

    where = f" ({context})" if context else ""
    user_dir = option_value(args, "--user-dir")
    if user_dir is not None and not os.path.isdir(user_dir):
        raise LaunchError(
            f"--user-dir {user_dir!r} is not a directory{where} (relative paths start at {os.getcwd()})"
        )
    args = _without_this_plugin(args)
    try:
        args = complete_training_command(args)  # as fairseq-train will: the short form, its refusals
    except UsageError as error:
        raise LaunchError(f"{error}{where}") from None
    parser = options.get_training_parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            namespace, unknown = options.parse_args_and_arch(parser, input_args=args, parse_known=True)
    except SystemExit as exit_:
        lines = stderr.getvalue().strip().splitlines()
        reason = exit_.code if isinstance(exit_.code, str) else (lines[-1] if lines else f"exit {exit_.code}")
        reason = re.sub(r"^\S+: error: ", "", reason)
        raise LaunchError(f"fairseq-train rejects the arguments{where}: {reason}") from None
    except RuntimeError:  # fairseq's bare error for a default --arch whose model is not registered
        raise LaunchError(
            f"fairseq-train has no model for --arch {option_value(args, '--arch') or '(not given)'}{where}: "
            "name one, e.g. --arch expire_span_lm"
        ) from None
    checked = TrainArguments(namespace, frozenset(parser._option_string_actions))
    check_grid_keys(grid_keys, checked)
    if unknown:
        raise LaunchError(
            f"fairseq-train does not know {' '.join(unknown)} for {checked.describe()}{where}"
            + _suggestion(option_names(unknown), checked.options)
        )
    for data in str(getattr(namespace, "data", "") or "").split(":"):
        if data and not os.path.isdir(data):
            raise LaunchError(
                f"data directory {data!r} does not exist{where}; relative paths start at {os.getcwd()}, "
                "where the job runs too"
            )
    return checked


def _suggestion(names: Sequence[str], known: frozenset) -> str:
    hints = [
        f"{name} -> {', '.join(close)}"
        for name in names
        if (close := difflib.get_close_matches(name, known, 3, cutoff=0.75))
    ]
    return f" (did you mean: {'; '.join(hints)})" if hints else ""


def normalize_key(key: str) -> str:
    """A grid key as a fairseq option: ``expire_span_alpha``, ``--expire-span-alpha`` -> ``expire-span-alpha``."""
    return str(key).strip().lstrip("-").replace("_", "-")


def check_grid_keys(keys: Sequence[str], checked: TrainArguments) -> None:
    """Every grid key must be an option of fairseq-train for this task, arch and criterion."""
    unknown = [key for key in keys if f"--{key}" not in checked.options]
    if unknown:
        raise LaunchError(
            f"grid key(s) {', '.join(unknown)}: fairseq-train has no such option for {checked.describe()}"
            + _suggestion([f"--{key}" for key in unknown], checked.options)
            + ". Nothing was submitted"
        )


def grid_point_args(params: Dict[str, object]) -> List[str]:
    """``{"lr": "1e-3", "expire-span-noisy": True}`` -> ``["--lr", "1e-3", "--expire-span-noisy"]``.

    ``True`` turns a flag on, ``False`` leaves it out.
    """
    args = []
    for key, value in params.items():
        if value is True:
            args.append(f"--{key}")
        elif value is not False:
            args += [f"--{key}", str(value)]
    return args
