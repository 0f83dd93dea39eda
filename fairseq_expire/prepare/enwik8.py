"""enwik8: the first 10^8 bytes of an English Wikipedia XML dump (Hutter prize), one token per byte.

Split (the literature's): the first N - V - T bytes train, the next V valid, the last T test. By default V and T are
each 5% of the file, which is 5,000,000 bytes on the real 100,000,000-byte enwik8 (90M / 5M / 5M); other sizes (a
sample, a test file) keep those fractions, and ``--valid-bytes`` / ``--test-bytes`` set them exactly.

Newlines: ``--newlines drop`` removes them, as Transformer-XL and the Expire-Span paper do
(the paper's 0.994 bpb is over the non-newline bytes); ``--newlines eos`` makes each one the token ``</s>``, as
fairseq's adaptive-span recipe does. Say which one a reported number uses.

The zip is read as a stream (a few MB in memory) and checked against the published MD5 of enwik8.
"""

import hashlib
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fairseq_expire.cli import list_option, option

from .download import fetch
from .output import SPLITS, DataDirectory, PrepareError, force_option
from .vocab import NEWLINE, NEWLINE_MODES, ByteVocabulary

logger = logging.getLogger(__name__)

URLS = [
    "https://mattmahoney.net/dc/enwik8.zip",
    "http://mattmahoney.net/dc/enwik8.zip",
    "https://cs.fit.edu/~mmahoney/compression/enwik8.zip",
    "https://web.archive.org/web/2020/http://mattmahoney.net/dc/enwik8.zip",
]
MEMBER = "enwik8"
MD5 = "a1fa5ffddb56f4953e226637dabbb36a"  # of the 100,000,000-byte member, published on the Hutter prize page
HELD_OUT_PERCENT = 5  # of the file, for valid and for test
CHUNK_BYTES = 1 << 22


@dataclass
class Enwik8Config:
    out: Path = option(Path("data-bin/enwik8"), "the data directory to write")
    zip: Optional[Path] = option(None, "a local enwik8.zip to use instead of downloading one", metavar="PATH")
    download_dir: Path = option(Path("data-bin/downloads"), "where the downloaded enwik8.zip is kept")
    urls: List[str] = list_option(
        lambda: list(URLS), "mirrors of enwik8.zip, tried in turn (http(s), file:// or a path)", metavar="URL"
    )
    md5: str = option(
        MD5,
        "expected MD5 of the enwik8 member (the published one; change it only "
        "for another file on purpose)",
    )
    newlines: str = option(
        "drop",
        "drop: remove newline bytes (the paper's numbers); eos: each newline is the token </s> "
        "(fairseq's adaptive-span recipe)",
        choices=NEWLINE_MODES,
    )
    valid_bytes: Optional[int] = option(
        None,
        "bytes of the valid split, taken before the test split (default: 5% of "
        "the file, 5,000,000 for enwik8)",
    )
    test_bytes: Optional[int] = option(
        None, "bytes of the test split, the end of the file (default: 5% of the file)"
    )
    force: bool = force_option()


def split_bounds(
    total: int, valid_bytes: Optional[int] = None, test_bytes: Optional[int] = None
) -> Dict[str, Tuple[int, int]]:
    """Byte ranges ``[begin, end)`` of train, valid and test in a file of ``total`` bytes (see the module doc)."""
    held_out = total * HELD_OUT_PERCENT // 100
    valid = held_out if valid_bytes is None else valid_bytes
    test = held_out if test_bytes is None else test_bytes
    if valid < 1 or test < 1 or valid + test >= total:
        raise PrepareError(
            f"cannot split {total:,} bytes into train, {valid:,} valid and {test:,} test bytes: each split needs "
            "at least one byte (set --valid-bytes and --test-bytes, or use a larger file)"
        )
    train = total - valid - test
    return {"train": (0, train), "valid": (train, train + valid), "test": (train + valid, total)}


def _open_member(path: Path, downloaded: bool) -> Tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    fix = (
        f"delete {path} and run again to download it anew"
        if downloaded
        else "get a complete copy of enwik8.zip"
    )
    if path.stat().st_size == 0:
        raise PrepareError(f"{path} is empty: {fix}")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise PrepareError(
            f"{path} is not a complete zip file ({error}; a cut-short download?): {fix}"
        ) from error
    try:
        return archive, archive.getinfo(MEMBER)
    except KeyError:
        archive.close()
        names = ", ".join(archive.namelist()[:10]) or "nothing"
        raise PrepareError(f"{path} has no member named {MEMBER!r} (it holds {names}): {fix}") from None


def _chunks(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, fix: str):
    try:
        with archive.open(info) as member:
            for chunk in iter(lambda: member.read(CHUNK_BYTES), b""):
                yield chunk
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as error:
        raise PrepareError(f"{path} is damaged ({error}): {fix}") from error


def prepare_enwik8(config: Enwik8Config) -> dict:
    recipe = {
        "md5": config.md5,
        "newlines": config.newlines,
        "valid_bytes": config.valid_bytes if config.valid_bytes is not None else "5% of the file",
        "test_bytes": config.test_bytes if config.test_bytes is not None else "5% of the file",
    }
    target = DataDirectory(config.out, "enwik8", recipe, config.force)
    record = target.finished()
    if record is not None:
        logger.info(f"{config.out} is already prepared (delete it or pass --force to prepare it again)")
        return record
    downloaded = config.zip is None
    zip_path = fetch(config.urls, config.download_dir / "enwik8.zip") if downloaded else Path(config.zip)
    if not zip_path.is_file():
        raise PrepareError(f"--zip {zip_path}: no such file")
    fix = f"delete {zip_path} and run again to download it anew" if downloaded else "get a complete copy"
    archive, info = _open_member(zip_path, downloaded)
    bounds = split_bounds(info.file_size, config.valid_bytes, config.test_bytes)
    vocab = ByteVocabulary(config.newlines)
    md5 = hashlib.md5()
    newlines = dict.fromkeys(SPLITS, 0)
    with archive, target:
        writers = target.writers(vocab.dictionary)
        offset = 0
        for chunk in _chunks(archive, info, zip_path, fix):
            md5.update(chunk)
            for split, (begin, end) in bounds.items():
                piece = chunk[max(begin - offset, 0) : max(end - offset, 0)]
                if piece:
                    newlines[split] += piece.count(NEWLINE)
                    writers[split].write(vocab.encode(piece))
            offset += len(chunk)
        if offset != info.file_size:
            raise PrepareError(f"{zip_path} gave {offset:,} bytes of {MEMBER}, not {info.file_size:,}: {fix}")
        if md5.hexdigest() != config.md5:
            raise PrepareError(
                f"{MEMBER} in {zip_path} has MD5 {md5.hexdigest()}, not {config.md5}: it is damaged or not "
                f"enwik8 ({fix}; pass --md5 {md5.hexdigest()} only if you mean to use this other file)"
            )
        for writer in writers.values():
            writer.close()
        vocab.dictionary.count = writers["train"].counts.tolist()
        splits = {
            split: {
                "bytes": end - begin,
                "byte_range": [begin, end],
                "newlines": newlines[split],
                "tokens": writers[split].tokens,
                "unknown": 0,
            }
            for split, (begin, end) in bounds.items()
        }
        return target.finish(
            vocab.dictionary,
            splits,
            {
                "source": {
                    "zip": str(zip_path),
                    "zip_bytes": zip_path.stat().st_size,
                    "member": MEMBER,
                    "member_bytes": info.file_size,
                    "member_md5": md5.hexdigest(),
                },
                "tokenization": vocab.describe(),
                "split_rule": "first N-V-T bytes train, next V valid, last T test",
            },
            [
                f"enwik8 ({info.file_size:,} bytes, MD5 {md5.hexdigest()}), one token per byte; dict.txt symbols "
                "are the decimal byte values, so every byte has a token and valid/test have no <unk>.",
                "Split: " + ", ".join(f"{s} bytes [{b:,}, {e:,})" for s, (b, e) in bounds.items()) + ".",
                f"Newlines (--newlines {config.newlines}): {vocab.describe()['newline_handling']}.",
            ],
        )
