"""The command-line rules of fairseq-train with this plugin's models, in one place: the one correct training
command, the completion of the product card's short form (``fairseq-train DATA --user-dir fairseq_expire --arch
expire_span_lm``), and the refusal of a command that would train the wrong thing. fairseq-train (through the compat
layer) and the launchers (before submitting) both check a command here; the task checks what needs the data.
"""

import argparse
import logging
import shlex
from typing import List, Sequence

from fairseq_expire.errors import UsageError

logger = logging.getLogger(__name__)

TASK = "language_modeling_with_memory"
CRITERION = "expire_span_cross_entropy"


def training_command(data: str = "data-bin/enwik8", arch: str = "expire_span_lm") -> str:
    return (
        f"fairseq-train {data} --user-dir fairseq_expire --task {TASK} --arch {arch} --criterion {CRITERION} "
        "--tokens-per-sample 512 --batch-size 8 --optimizer adam --lr 7e-4"
    )


def batch_size_required(data: str = "DATA_DIR", arch: str = "expire_span_lm") -> str:
    """Why a batch is given as --batch-size here: without it fairseq-train stops on an assertion deep inside
    fairseq, and --max-tokens alone does not say how many streams to keep."""
    return (
        "--batch-size N is required: the number of contiguous streams per process, each read --tokens-per-sample "
        f"tokens at a time (--max-tokens does not apply). For example:\n  {training_command(data, arch)}"
    )


# The paper's training recipe (appendix A.2, enwik8: Adam 7e-4, 8000 linear warm-up steps then constant, block 512,
# 512 streams per update, 100k updates; gradient clipping 0.3 from the reference scripts), and what a preset's
# own experiment changes in it. --batch-size here is the streams of an update in all, split over the processes.
RECIPE = {
    "--optimizer": "adam",
    "--lr": "7e-4",
    "--lr-scheduler": "fixed",
    "--warmup-updates": "8000",
    "--clip-norm": "0.3",
    "--tokens-per-sample": "512",
    "--max-update": "100000",
    "--batch-size": "512",
}
PRESET_RECIPES = {
    "expire_span_lm_enwik8_small": {"--lr": "3e-4", "--tokens-per-sample": "256", "--batch-size": "64"},
    "expire_span_lm_pg19": {"--lr-scheduler": "cosine"},
    "expire_span_lm_collision": {"--lr": "1e-4", "--clip-norm": "0.1", "--tokens-per-sample": "256"},
    "expire_span_lm_wt103": {"--tokens-per-sample": "256", "--clip-norm": "0.1", "--max-update": "300000"},
}
# An option of the recipe is only added when the option it belongs to is unset or has the recipe's value: Adam's
# learning rate is no SGD learning rate, warm-up steps are an option of the scheduler, --max-epoch is the user's limit.
DEPENDS_ON = {"--lr": "--optimizer", "--warmup-updates": "--lr-scheduler", "--max-update": "--max-epoch"}
ALIASES = {"--arch": ("-a",), "--batch-size": ("--max-sentences",)}  # fairseq's other spellings


def _typed_options(argv: Sequence[str]) -> dict:
    """The options of ``argv`` the completion looks at, None where not typed. fairseq's parsers take no
    abbreviations (``allow_abbrev=False``), so an option is typed exactly when one of its spellings is."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for option in ("--task", "--criterion", "--arch", *RECIPE, "--max-epoch", "--distributed-world-size"):
        parser.add_argument(option, *ALIASES.get(option, ()), dest=option)
    parser.add_argument("--cpu", action="store_true", dest="--cpu")
    return vars(parser.parse_known_args(argv)[0])


def _plugin_arch(arch) -> bool:
    from fairseq.models import ARCH_MODEL_REGISTRY

    model = ARCH_MODEL_REGISTRY.get(arch)
    return model is not None and model.__module__.split(".")[0] == __name__.split(".")[0]


def _processes(typed: dict) -> int:
    """Data-parallel processes as fairseq counts them by default: --distributed-world-size, else one per GPU."""
    size = typed["--distributed-world-size"]
    if size is not None and size.isdigit():
        return max(1, int(size))
    if typed["--cpu"]:
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def complete_training_command(argv: Sequence[str]) -> List[str]:
    """fairseq-train's ``argv``, completed when it names an architecture of this plugin and leaves out ``--task``
    or ``--criterion`` (the card's short form): fairseq's defaults there (translation, cross_entropy) would train
    the wrong thing, and without --batch-size, --optimizer and --lr fairseq refuses or diverges (lr 0.25).

    Adds this plugin's task and criterion and, for what the command leaves unset, the paper's recipe; typed
    options always win, and a different --task or --criterion typed is refused, as is a full command without
    --batch-size. Logs the completed command.
    """
    typed = _typed_options(argv)
    arch = typed["--arch"]
    if arch is None or not _plugin_arch(arch):
        return list(argv)
    ours = {"--task": TASK, "--criterion": CRITERION}
    wrong = [f"{name} {typed[name]}" for name in ours if typed[name] not in (None, ours[name])]
    if wrong:
        raise UsageError(
            f"--arch {arch} cannot train with {' and '.join(wrong)}: its memory needs contiguous streams "
            f"(--task {TASK}) and its spans the span loss (--criterion {CRITERION}); leave --task and "
            "--criterion out to get both and the paper's recipe"
        )
    if None not in (typed["--task"], typed["--criterion"]):
        if typed["--batch-size"] is None:
            data = argv[0] if argv and not argv[0].startswith("-") else "DATA_DIR"
            raise UsageError(f"--arch {arch}: {batch_size_required(data, arch)}")
        return list(argv)
    recipe = {**RECIPE, **PRESET_RECIPES.get(arch, {})}
    added, streams = {name: value for name, value in ours.items() if typed[name] is None}, ""
    for option, value in recipe.items():
        depends = DEPENDS_ON.get(option)
        if typed[option] is None and (depends is None or typed[depends] in (None, recipe.get(depends))):
            added[option] = value
    if "--batch-size" in added:
        processes = _processes(typed)
        added["--batch-size"] = str(max(1, int(recipe["--batch-size"]) // processes))
        streams = f"; --batch-size: the paper's {recipe['--batch-size']} streams per update over {processes} process(es)"
    completed = [*argv, *(word for pair in added.items() for word in pair)]
    logger.info(
        f"--arch {arch} without --task/--criterion: fairseq's defaults would train the wrong thing, so this "
        f"plugin added {' '.join(f'{k} {v}' for k, v in added.items())} (its task and criterion, and the paper's "
        f"recipe, appendix A.2, for what the command left unset{streams}). Training with: "
        f"fairseq-train {shlex.join(completed)}"
    )
    return completed
