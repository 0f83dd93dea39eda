"""Wikitext-103 (word level, 267K words) binarized by ``fairseq-preprocess``, as in fairseq's own recipe.

The original address (Salesforce's S3 bucket) is dead; the mirrors below serve the same ``wikitext-103-v1.zip``,
checked against its MD5. The three token files are unpacked into the output's work directory and given to
``fairseq-preprocess --only-source`` (one ``</s>`` per line, a dictionary of the train words, most frequent first).
"""

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from fairseq.data import Dictionary

from fairseq_expire.cli import list_option, option

from .download import fetch
from .output import SPLITS, DataDirectory, PrepareError, binarized_statistics, file_md5, force_option

logger = logging.getLogger(__name__)

URLS = [
    "https://wikitext.smerity.com/wikitext-103-v1.zip",
    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",  # the original, now dead
    "https://web.archive.org/web/2019/https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
]
MD5 = "9ddaacaf6af0710eda8c456decff7832"
MEMBERS = {split: f"wikitext-103/wiki.{split}.tokens" for split in SPLITS}


@dataclass
class Wikitext103Config:
    out: Path = option(Path("data-bin/wikitext-103"), "the data directory to write")
    zip: Optional[Path] = option(None, "a local wikitext-103-v1.zip to use instead of downloading one")
    download_dir: Path = option(Path("data-bin/downloads"), "where the downloaded zip is kept")
    urls: List[str] = list_option(
        lambda: list(URLS), "mirrors of wikitext-103-v1.zip, tried in turn (http(s), file:// or a path)"
    )
    md5: str = option(MD5, "expected MD5 of the zip")
    workers: int = option(min(8, os.cpu_count() or 1), "fairseq-preprocess --workers")
    force: bool = force_option()


def fairseq_preprocess() -> List[str]:
    """The ``fairseq-preprocess`` of this Python environment."""
    script = Path(sys.executable).parent / "fairseq-preprocess"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fairseq_cli.preprocess"]


def _unpack(zip_path: Path, work: Path, fix: str) -> dict:
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for split, member in MEMBERS.items():
                with archive.open(member) as source, open(work / f"{split}.tokens", "wb") as target:
                    shutil.copyfileobj(source, target, 1 << 22)
    except KeyError as error:
        raise PrepareError(f"{zip_path} is not wikitext-103-v1.zip ({error.args[0]}): {fix}") from None
    except (zipfile.BadZipFile, EOFError) as error:
        raise PrepareError(f"{zip_path} is not a complete zip file ({error}): {fix}") from error
    return {split: file_md5(work / f"{split}.tokens") for split in SPLITS}


def prepare_wikitext103(config: Wikitext103Config) -> dict:
    target = DataDirectory(config.out, "wikitext-103", {"md5": config.md5}, config.force)
    record = target.finished()
    if record is not None:
        logger.info(f"{config.out} is already prepared (delete it or pass --force to prepare it again)")
        return record
    downloaded = config.zip is None
    if downloaded:
        zip_path = fetch(config.urls, config.download_dir / "wikitext-103-v1.zip", config.md5)
        fix = f"delete {zip_path} and run again"
    else:
        zip_path = Path(config.zip)
        if not zip_path.is_file():
            raise PrepareError(f"--zip {zip_path}: no such file")
        fix = "get a complete copy of wikitext-103-v1.zip"
        got = file_md5(zip_path)
        if got != config.md5:
            raise PrepareError(
                f"{zip_path} has MD5 {got}, not {config.md5}: it is damaged or another file ({fix}; pass --md5 "
                f"{got} only if you mean to use this other file)"
            )
    with target:
        work = target.work
        text_md5 = _unpack(zip_path, work, fix)
        command = fairseq_preprocess() + [
            "--only-source",
            *(f"--{split}pref={work / split}.tokens" for split in SPLITS),
            f"--destdir={work}",
            f"--workers={config.workers}",
        ]
        logger.info("running " + " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise PrepareError(
                f"fairseq-preprocess failed (exit status {result.returncode}):\n{result.stderr[-3000:]}"
            )
        for split in SPLITS:
            (work / f"{split}.tokens").unlink()
        dictionary = Dictionary.load(str(work / "dict.txt"))
        statistics = binarized_statistics(work, dictionary)
        return target.finish(
            dictionary,
            {split: {**statistics[split], "text_md5": text_md5[split]} for split in SPLITS},
            {
                "source": {"zip": str(zip_path), "zip_md5": config.md5, "members": MEMBERS},
                "tokenization": {
                    "unit": "words",
                    "symbols": "the words of wiki.*.tokens (already tokenized by the dataset's authors)",
                    "newlines": "eos",
                    "newline_handling": "fairseq-preprocess ends every line with </s>",
                },
                "preprocess_command": " ".join(command[1:]),
            },
            [
                f"Wikitext-103 (wikitext-103-v1.zip, MD5 {config.md5}), word level, binarized with "
                "`fairseq-preprocess --only-source` (dict.txt: the train words, most frequent first; every line "
                "ends with </s>).",
            ],
        )
