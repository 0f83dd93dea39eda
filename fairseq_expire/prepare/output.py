"""A data directory as every preparer and synthetic generator writes it: never one that looks finished and is not.

Everything is written into a temporary sibling directory; ``prepare.json`` (the record of how the data was made)
is written last and the directory is then renamed into place. A later run with the same recipe (the options that
decide the data) finds the record, checks that the files it lists are all there with their recorded sizes, and
does nothing; a damaged directory is prepared again; a directory made with another recipe is only replaced with
``--force``.
"""

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
from fairseq.data import Dictionary, indexed_dataset

from fairseq_expire.cli import option
from fairseq_expire.errors import UsageError

logger = logging.getLogger(__name__)

RECORD = "prepare.json"
README = "README.md"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
# Tokens per binary item: the memory task reads a split as one sequence, so items only bound the cost of a read.
ITEM_TOKENS = 2048


class PrepareError(UsageError):
    """Input or output that cannot give a correct data directory; the message names the problem and the fix."""


def force_option():
    """Every preparer's ``--force``; what it replaces is :class:`DataDirectory`'s rule."""
    return option(False, "prepare again even if --out already holds finished data")


def file_md5(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


class SplitWriter:
    """One split in fairseq's mmap format (``{prefix}.bin/.idx``), written as token ids arrive."""

    def __init__(self, prefix: Path, dictionary: Dictionary):
        self.prefix = prefix
        self.builder = indexed_dataset.make_builder(f"{prefix}.bin", impl="mmap", vocab_size=len(dictionary))
        self.counts = np.zeros(len(dictionary), dtype=np.int64)
        self.tokens = 0

    def write(self, ids: np.ndarray):
        self.counts += np.bincount(ids, minlength=len(self.counts))
        self.tokens += len(ids)
        for start in range(0, len(ids), ITEM_TOKENS):
            self.builder.add_item(torch.from_numpy(ids[start : start + ITEM_TOKENS]))

    def close(self):
        self.builder.finalize(f"{self.prefix}.idx")


def _json_value(value):
    return json.loads(json.dumps(value, default=str))


class DataDirectory:
    """The output directory ``out`` of one preparation with the given ``recipe``.

    Use :meth:`finished` first (the record of an existing, complete output of the same recipe: nothing to do),
    then ``with DataDirectory(...) as data:`` write into ``data.work`` and end with :meth:`finish`.
    """

    def __init__(
        self, out: Path, dataset: str, recipe: dict, force: bool = False, inputs: Optional[dict] = None
    ):
        """``recipe``: the options that decide the data (other ones need ``--force``); ``inputs``: what identifies
        the input files (sizes, times), whose change means the data is prepared again."""
        self.out = Path(out)
        self.dataset = dataset
        self.recipe = _json_value(recipe)
        self.inputs = _json_value(inputs)
        self.force = force
        self.work: Optional[Path] = None
        self.started = time.time()

    def finished(self) -> Optional[dict]:
        """The record of ``out`` when it is complete and made with this recipe; None when it must be (re)made.

        Raises :class:`PrepareError` when ``out`` holds something that must not be replaced without ``--force``.
        """
        out = self.out
        if not out.exists():
            return None
        if not out.is_dir():
            raise PrepareError(f"{out} exists and is not a directory: remove it or choose another --out")
        if not (out / RECORD).exists():
            if self.force or not any(out.iterdir()):
                return None
            raise PrepareError(
                f"{out} exists but was not made by this script (it has no {RECORD}): remove it, choose another "
                "--out, or pass --force to replace it"
            )
        try:
            record = json.loads((out / RECORD).read_text(encoding="utf-8"))
            files, recorded = record["files"], record["recipe"]
            if not isinstance(files, dict) or not isinstance(recorded, dict):
                raise ValueError("not a record of this script")
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning(f"{out}/{RECORD} is unreadable ({error}): preparing {out} again")
            return None
        if record.get("dataset") != self.dataset and not self.force:
            raise PrepareError(
                f"{out} holds {record.get('dataset')} data, not {self.dataset}: choose another --out, or pass "
                "--force to replace it"
            )
        if recorded != self.recipe:
            changed = sorted(
                key for key in set(recorded) | set(self.recipe) if recorded.get(key) != self.recipe.get(key)
            )
            if self.force:
                logger.info(f"--force: replacing {out} (made with other options: {', '.join(changed)})")
                return None
            raise PrepareError(
                f"{out} holds data prepared with other options ("
                + "; ".join(
                    f"{key}: {recorded.get(key)!r} there, {self.recipe.get(key)!r} now" for key in changed
                )
                + "): choose another --out, or pass --force to replace it"
            )
        damaged = [
            name
            for name, info in files.items()
            if not (out / name).is_file() or (out / name).stat().st_size != info.get("bytes")
        ]
        if damaged:
            logger.warning(
                f"{out} is incomplete or damaged ({', '.join(sorted(damaged))} missing or resized): "
                "preparing it again"
            )
            return None
        if record.get("inputs") != self.inputs:
            logger.info(f"the input files changed since {out} was made: preparing it again")
            return None
        if self.force:
            logger.info(f"--force: preparing {out} again")
            return None
        return record

    def __enter__(self) -> "DataDirectory":
        parent = self.out.parent
        for pattern in (f".{self.out.name}.partial-*", f".{self.out.name}.old-*"):
            for leftover in parent.glob(pattern) if parent.is_dir() else ():
                logger.info(f"removing {leftover}, left by an interrupted run")
                shutil.rmtree(leftover, ignore_errors=True)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.work = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=parent))
        except OSError as error:
            raise PrepareError(
                f"cannot create the output directory {self.out} ({error}): choose a writable --out"
            ) from error
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.work, 0o777 & ~umask)  # mkdtemp makes it private; the data should not be
        return self

    def __exit__(self, kind, error, traceback):
        if self.work is not None and self.work.exists():
            shutil.rmtree(self.work, ignore_errors=True)
        if isinstance(error, OSError):
            raise PrepareError(f"preparing {self.out} failed, nothing was written there: {error}") from error
        return False

    def writers(self, dictionary: Dictionary, splits: Iterable[str] = SPLITS) -> Dict[str, SplitWriter]:
        return {split: SplitWriter(self.work / split, dictionary) for split in splits}

    def finish(
        self,
        dictionary: Dictionary,
        splits: Dict[str, dict],
        details: dict,
        readme: List[str],
    ) -> dict:
        """Write ``dict.txt`` (unless already there), the README and the record, then move the directory into place.

        ``splits``: per split at least ``tokens``; ``details``: source, tokenization and whatever else explains the
        data; ``readme``: paragraphs that say how the data was made, in words.
        """
        for split, stats in splits.items():
            if stats["tokens"] == 0:
                raise PrepareError(f"the {split} split of {self.dataset} is empty: give it some text")
        if not (self.work / "dict.txt").exists():
            dictionary.save(str(self.work / "dict.txt"))
        files = {
            path.name: {"bytes": path.stat().st_size, "md5": file_md5(path)}
            for path in sorted(self.work.iterdir())
            if path.is_file()
        }
        record = _json_value(
            {
                "format_version": FORMAT_VERSION,
                "dataset": self.dataset,
                "recipe": self.recipe,
                "inputs": self.inputs,
                **details,
                "dictionary_size": len(dictionary),
                "splits": splits,
                "files": files,
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.time() - self.started, 1),
            }
        )
        (self.work / README).write_text(self._readme(record, readme), encoding="utf-8")
        record["files"][README] = {
            "bytes": (self.work / README).stat().st_size,
            "md5": file_md5(self.work / README),
        }
        (self.work / RECORD).write_text(
            json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        self._install()
        logger.info(
            f"wrote {self.out}: "
            + ", ".join(f"{split} {stats['tokens']:,} tokens" for split, stats in splits.items())
            + f" ({record['seconds']} s)"
        )
        return record

    def _readme(self, record: dict, paragraphs: List[str]) -> str:
        lines = [f"# {self.dataset}", "", *[f"{p}\n" for p in paragraphs]]
        lines += ["| split | tokens |", "|---|---:|"]
        lines += [f"| {split} | {stats['tokens']:,} |" for split, stats in record["splits"].items()]
        lines += [
            "",
            f"Dictionary: {record['dictionary_size']} symbols (dict.txt). Made by `{record['command']}` on "
            f"{record['created']}; {RECORD} has the details (recipe, checksums of the source and of every file).",
            "",
            "Train with",
            "",
            f"    fairseq-train {self.out} --user-dir fairseq_expire --task language_modeling_with_memory "
            "--criterion expire_span_cross_entropy --arch ...",
            "",
        ]
        return "\n".join(lines)

    def _install(self):
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / self.out.name)
        os.replace(self.work, self.out)
        self.work = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def binarized_statistics(
    directory: Path, dictionary: Dictionary, splits: Iterable[str] = SPLITS
) -> Dict[str, dict]:
    """Tokens and ``<unk>`` tokens of each binarized split of ``directory``."""
    statistics = {}
    for split in splits:
        dtype = indexed_dataset.MMapIndexedDataset.Index(f"{directory / split}.idx").dtype
        data = directory / f"{split}.bin"
        tokens = np.memmap(data, dtype=dtype, mode="r") if data.stat().st_size else np.zeros(0, dtype)
        statistics[split] = {"tokens": len(tokens), "unknown": int((tokens == dictionary.unk()).sum())}
        del tokens
    return statistics
