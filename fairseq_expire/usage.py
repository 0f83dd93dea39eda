"""The one correct training command, and the check that stops a command that would train the wrong thing."""

TASK = "language_modeling_with_memory"
CRITERION = "expire_span_cross_entropy"


def training_command(data: str = "data-bin/enwik8", arch: str = "expire_span_lm") -> str:
    return (
        f"fairseq-train {data} --user-dir fairseq_expire --task {TASK} --arch {arch} --criterion {CRITERION} "
        "--tokens-per-sample 512 --batch-size 8 --optimizer adam --lr 7e-4"
    )


def check_training_command(args) -> None:
    """Refuse fairseq's defaults (translation task, cross_entropy criterion) and the shuffled-block LM task.

    Those would train silently with a garbage cache or without the span loss. Exits like argparse does.
    """
    wrong = [
        f"--{name} {getattr(args, name, None)} (needs --{name} {expected})"
        for name, expected in (("task", TASK), ("criterion", CRITERION))
        if getattr(args, name, None) != expected
    ]
    if wrong:
        arch = getattr(args, "arch", "expire_span_lm")
        data = getattr(args, "data", None) or "DATA_DIR"
        raise SystemExit(
            f"error: --arch {arch} cannot train with "
            + " and ".join(wrong)
            + ". Memory models need contiguous "
            "streams and the span loss. Run:\n  " + training_command(data, arch)
        )


def check_batch_size(args) -> None:
    """A batch is ``--batch-size`` streams of ``--tokens-per-sample`` tokens; without it fairseq-train stops on an
    assertion deep inside fairseq, and ``--max-tokens`` alone does not say how many streams to keep."""
    if getattr(args, "batch_size", None) is None:
        arch = getattr(args, "arch", "expire_span_lm")
        raise SystemExit(
            f"error: --arch {arch} needs --batch-size N: the number of contiguous streams per GPU, each read "
            "--tokens-per-sample tokens at a time (--max-tokens does not apply). Run:\n  "
            + training_command(getattr(args, "data", None) or "DATA_DIR", arch)
        )
