"""PG-19 at the character level: the books of the public ``deepmind-gutenberg`` bucket, one token per character.

The vocabulary is every character of the train books (the paper counts 3506), most frequent first; characters
that only valid or test use become ``<unk>`` and are counted in the record. Newlines as for enwik8 (``--newlines
eos`` by default here: PG-19 wraps lines inside paragraphs, so dropping newlines would glue words together).

The 11 GB of train text is never held or written as text: books are read one at a time by parallel workers (a
bounded number in flight) and their token ids appended to fairseq's binary files in book order. Two passes: one
counts the characters of train, one encodes every split.

``--source`` is the bucket: ``gs://deepmind-gutenberg`` or its https address (books are downloaded into
``--download-dir``, MD5-checked, resumable), or a local copy of it (a directory with ``train/ validation/ test/``).
"""

import base64
import collections
import hashlib
import json
import logging
import multiprocessing
import os
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from fairseq_expire.cli import option

from .download import DownloadError, as_url, fetch, open_url, url_to_path
from .output import SPLITS, DataDirectory, PrepareError, force_option
from .vocab import (
    CODE_POINTS,
    ENCODING_ERRORS,
    NEWLINE_MODES,
    CharVocabulary,
    count_characters,
    unknown_report,
)

logger = logging.getLogger(__name__)

BUCKET = "https://storage.googleapis.com/deepmind-gutenberg"
FOLDERS = {"train": "train", "valid": "validation", "test": "test"}
PAPER_CHARACTERS = 3506
PROGRESS_BOOKS = 2000  # log progress every this many books


@dataclass
class Pg19Config:
    out: Path = option(Path("data-bin/pg19"), "the data directory to write")
    source: str = option(
        BUCKET,
        "the PG-19 bucket: gs://deepmind-gutenberg, its https:// address, or a local copy "
        "(directory or file:// URL with train/ validation/ test/)",
    )
    download_dir: Path = option(Path("data-bin/downloads/pg19"), "where downloaded books are kept")
    newlines: str = option(
        "eos",
        "eos: each newline is the token </s>; drop: remove newlines (glues the words of wrapped lines)",
        choices=NEWLINE_MODES,
    )
    max_books: Optional[int] = option(
        None, "use only the first N books (by book number) of each split, for a subset"
    )
    workers: int = option(min(8, os.cpu_count() or 1), "processes reading and encoding books")
    download_threads: int = option(8, "books downloaded at once")
    encoding_errors: str = option(
        "strict",
        "a book that is not valid UTF-8: strict stops with an error naming it, replace uses U+FFFD for the bad "
        "bytes",
        choices=ENCODING_ERRORS,
    )
    force: bool = force_option()


@dataclass
class Book:
    name: str  # path in the bucket, e.g. "train/10.txt"
    size: Optional[int] = None
    md5: Optional[str] = None  # hex, when the bucket listing gives it


def _book_order(name: str):
    stem = Path(name).stem
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


class LocalBucket:
    """A copy of the bucket on disk: ``ROOT/{train,validation,test}/*.txt``."""

    def __init__(self, root: Path):
        self.root = root
        if not root.is_dir():
            raise PrepareError(f"--source {root}: no such directory")

    def __str__(self) -> str:
        return str(self.root)

    def books(self, folder: str) -> List[Book]:
        directory = self.root / folder
        if not directory.is_dir():
            raise PrepareError(f"--source {self.root} has no {folder}/ folder of books")
        return [
            Book(f"{folder}/{p.name}", p.stat().st_size) for p in directory.iterdir() if p.suffix == ".txt"
        ]

    def local_path(self, book: Book, download_dir: Path) -> Path:
        return self.root / book.name


class GcsBucket:
    """A public Google Cloud Storage bucket over HTTP: listed with the JSON API, books fetched by URL."""

    def __init__(self, url: str):
        parts = urllib.parse.urlparse(url.rstrip("/"))
        self.url = url.rstrip("/")
        self.bucket = parts.path.strip("/")
        self.api = f"{parts.scheme}://{parts.netloc}/storage/v1/b/{self.bucket}/o"

    def __str__(self) -> str:
        return self.url

    def books(self, folder: str) -> List[Book]:
        books, token = [], None
        while True:
            query = {"prefix": f"{folder}/", "fields": "items(name,size,md5Hash),nextPageToken"}
            if token:
                query["pageToken"] = token
            url = f"{self.api}?{urllib.parse.urlencode(query)}"
            try:
                with open_url(url) as response:
                    page = json.load(response)
            except (OSError, ValueError) as error:
                raise PrepareError(
                    f"cannot list {self.url}/{folder}/ ({url}: {error}): copy the bucket yourself "
                    f"(gsutil -m cp -r gs://{self.bucket} DIR) and pass --source DIR"
                ) from error
            for item in page.get("items", []):
                if item["name"].endswith(".txt"):
                    md5 = base64.b64decode(item["md5Hash"]).hex() if "md5Hash" in item else None
                    books.append(Book(item["name"], int(item.get("size", 0)), md5))
            token = page.get("nextPageToken")
            if not token:
                return books

    def local_path(self, book: Book, download_dir: Path) -> Path:
        return download_dir / book.name

    def download(self, books: List[Book], download_dir: Path, threads: int):
        """Fetch the books not yet in ``download_dir`` (a finished book is kept; an interrupted one resumed)."""
        missing = [b for b in books if not (download_dir / b.name).exists()]
        if not missing:
            return
        logger.info(
            f"downloading {len(missing):,} of {len(books):,} books from {self.url} into {download_dir}"
        )
        failures = []

        def get(book: Book):
            try:
                fetch([f"{self.url}/{book.name}"], download_dir / book.name, book.md5, verbose=False)
            except DownloadError as error:
                failures.extend(error.failures)

        with ThreadPoolExecutor(threads) as pool:
            for done, _ in enumerate(pool.map(get, missing), 1):
                if done % PROGRESS_BOOKS == 0:
                    logger.info(f"downloaded {done:,} of {len(missing):,} books")
        if failures:
            raise PrepareError(
                f"{len(failures)} of {len(missing)} books could not be downloaded, e.g.\n  "
                + "\n  ".join(failures[:5])
                + "\nRun again to retry them (downloaded books are kept)."
            )


def open_bucket(source: str):
    if source.startswith("gs://"):
        return GcsBucket("https://storage.googleapis.com/" + source[len("gs://") :])
    url = as_url(source)
    if url.startswith("file:"):
        return LocalBucket(url_to_path(url))
    return GcsBucket(url)


class BookReader:
    """Reads one book (in a worker process): its text, its character counts, or its token ids."""

    def __init__(self, newlines: str, encoding_errors: str, vocab: Optional[CharVocabulary] = None):
        self.newlines = newlines
        self.encoding_errors = encoding_errors
        self.vocab = vocab

    def text(self, path: Path) -> Tuple[str, bytes]:
        data = path.read_bytes()
        try:
            return data.decode("utf-8", errors=self.encoding_errors), data
        except UnicodeDecodeError as error:
            raise PrepareError(
                f"{path} is not UTF-8 (byte {error.start}: {error.reason}): pass --encoding-errors replace to "
                "read bad bytes as U+FFFD"
            ) from None

    def count(self, path: Path) -> Tuple[np.ndarray, np.ndarray]:
        return count_characters(self.text(path)[0], self.newlines)

    def encode(self, path: Path) -> Tuple[np.ndarray, Dict[int, int], str, int]:
        """Token ids, the unknown characters with their counts, the book's MD5 and its size in bytes."""
        text, data = self.text(path)
        ids, unknown = self.vocab.encode(text)
        return ids, unknown, hashlib.md5(data).hexdigest(), len(data)


_worker_function: Optional[Callable] = None


def _set_worker_function(function: Callable):
    global _worker_function
    _worker_function = function


def _call_worker_function(item):
    return _worker_function(item)


def ordered_map(function: Callable, items: Iterable, workers: int) -> Iterator:
    """``map(function, items)`` in ``workers`` processes, in order, with at most ``2 * workers`` results waiting:
    memory stays bounded however many items there are. ``function`` is sent to each worker once."""
    if workers <= 1:
        yield from map(function, items)
        return
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    )
    with context.Pool(workers, initializer=_set_worker_function, initargs=(function,)) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(_call_worker_function, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def list_books(bucket, max_books: Optional[int]) -> Dict[str, List[Book]]:
    books = {}
    for split, folder in FOLDERS.items():
        found = sorted(bucket.books(folder), key=lambda b: _book_order(b.name))
        if not found:
            raise PrepareError(f"the {folder}/ folder of {bucket} has no books (*.txt)")
        books[split] = found[:max_books] if max_books is not None else found
    return books


def prepare_pg19(config: Pg19Config) -> dict:
    if config.max_books is not None and config.max_books < 1:
        raise PrepareError(f"--max-books {config.max_books}: give at least 1")
    recipe = {
        "newlines": config.newlines,
        "max_books": config.max_books,
        "encoding_errors": config.encoding_errors,
    }
    target = DataDirectory(config.out, "pg19", recipe, config.force)
    record = target.finished()
    if record is not None:
        logger.info(f"{config.out} is already prepared (delete it or pass --force to prepare it again)")
        return record
    bucket = open_bucket(config.source)
    books = list_books(bucket, config.max_books)
    logger.info("books: " + ", ".join(f"{split} {len(b):,}" for split, b in books.items()))
    if isinstance(bucket, GcsBucket):
        bucket.download(
            [b for split in SPLITS for b in books[split]], config.download_dir, config.download_threads
        )
    paths = {split: [bucket.local_path(b, config.download_dir) for b in books[split]] for split in SPLITS}

    counts = np.zeros(CODE_POINTS, dtype=np.int64)
    reader = BookReader(config.newlines, config.encoding_errors)
    for done, (codes, book_counts) in enumerate(ordered_map(reader.count, paths["train"], config.workers), 1):
        counts[codes] += book_counts
        if done % PROGRESS_BOOKS == 0:
            logger.info(f"counting characters: {done:,} of {len(paths['train']):,} train books")
    vocab = CharVocabulary(counts, config.newlines)
    del counts
    logger.info(f"{vocab.num_characters:,} characters in train (the paper has {PAPER_CHARACTERS:,})")
    reader.vocab = vocab

    splits = {}
    with target:
        writers = target.writers(vocab.dictionary)
        with open(target.work / "books.tsv", "w", encoding="utf-8") as listing:
            listing.write("split\tbook\tbytes\tmd5\ttokens\n")
            for split in SPLITS:
                unknown = collections.Counter()
                encoded = ordered_map(reader.encode, paths[split], config.workers)
                for done, (book, path, (ids, book_unknown, md5, size)) in enumerate(
                    zip(books[split], paths[split], encoded), 1
                ):
                    if done % PROGRESS_BOOKS == 0:
                        logger.info(f"encoding {split}: {done:,} of {len(books[split]):,} books")
                    if book.md5 is not None and md5 != book.md5:
                        raise PrepareError(
                            f"{path} has MD5 {md5}, but the bucket lists {book.md5}: delete it and run again"
                        )
                    writers[split].write(ids)
                    unknown.update(book_unknown)
                    listing.write(f"{split}\t{book.name}\t{size}\t{md5}\t{len(ids)}\n")
                writers[split].close()
                splits[split] = {
                    "books": len(books[split]),
                    "tokens": writers[split].tokens,
                    "unknown": int(sum(unknown.values())),
                    "unknown_characters": unknown_report(unknown),
                }
                logger.info(
                    f"{split}: {len(books[split]):,} books, {writers[split].tokens:,} tokens, "
                    f"{splits[split]['unknown']:,} <unk>"
                )
        return target.finish(
            vocab.dictionary,
            splits,
            {
                "source": {"bucket": config.source, "books_listing": "books.tsv (name, bytes, md5, tokens)"},
                "tokenization": {**vocab.describe(), "paper_characters": PAPER_CHARACTERS},
            },
            [
                f"PG-19 (books of {config.source}"
                + (f", the first {config.max_books} of each split" if config.max_books else "")
                + "), one token per character. Vocabulary: the "
                f"{vocab.num_characters:,} characters of the train books (the paper counts {PAPER_CHARACTERS}); "
                "dict.txt writes whitespace and unprintable characters as <U+XXXX>. Characters that train never "
                "shows are <unk> in valid/test (counted in prepare.json).",
                "Books are concatenated in the order of books.tsv (by number), which lists each book's MD5.",
                f"Newlines (--newlines {config.newlines}): {vocab.describe()['newline_handling']}.",
            ],
        )
