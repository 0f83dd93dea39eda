"""scripts/prepare_pg19.py on tiny fake buckets (a local directory, and the same served like Google Cloud Storage):
vocabulary from train only, <unk> in valid/test counted, exact round trip, memory flat in the number of books.
"""

import hashlib
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from fairseq.data import Dictionary, data_utils
from test_prepare_download import FakeServer, run_script

from fairseq_expire.prepare.output import PrepareError
from fairseq_expire.prepare.pg19 import BUCKET, GcsBucket, LocalBucket, Pg19Config, open_bucket, prepare_pg19
from fairseq_expire.prepare.vocab import decode

TRAIN_CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGH,.;:'\"!?-\n\n\téà—\u00a0\r"
ONLY_HELD_OUT = "Ω€\u2028"  # in valid/test books only: <unk>
FOLDERS = {"train": "train", "valid": "validation", "test": "test"}


def book_text(rng: np.random.Generator, chars: str, length: int) -> str:
    codes = np.array([ord(c) for c in chars], dtype="<u4")
    return codes[rng.integers(0, len(codes), length)].tobytes().decode("utf-32-le")


def make_bucket(root: Path, books=(12, 3, 3), length=3000, seed=0) -> Path:
    """``root/{train,validation,test}/N.txt``; valid and test books also use characters train never shows."""
    rng = np.random.default_rng(seed)
    for folder, count in zip(FOLDERS.values(), books):
        (root / folder).mkdir(parents=True)
        for number in range(count):
            text = book_text(rng, TRAIN_CHARS, length)
            if folder != "train":
                text += book_text(rng, ONLY_HELD_OUT, 5 + number)
            (root / folder / f"{number * 37 + 10}.txt").write_text(text, encoding="utf-8", newline="")
    (root / "metadata.csv").write_text("id,title\n")
    return root


def split_text(bucket: Path, split: str) -> str:
    books = sorted((bucket / FOLDERS[split]).glob("*.txt"), key=lambda p: int(p.stem))
    return "".join(p.read_bytes().decode("utf-8") for p in books)


def read_split(directory: Path, split: str):
    dictionary = Dictionary.load(str(directory / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(directory / split), dictionary, "mmap")
    return torch.cat([dataset[i] for i in range(len(dataset))]), dictionary


@pytest.fixture
def bucket(tmp_path):
    return make_bucket(tmp_path / "bucket")


def test_vocabulary_from_train_and_exact_round_trip(tmp_path, bucket):
    record = prepare_pg19(Pg19Config(out=tmp_path / "out", source=str(bucket), workers=1))
    train_ids, dictionary = read_split(tmp_path / "out", "train")
    train = split_text(bucket, "train")
    assert decode(train_ids, dictionary, "characters") == train.encode("utf-8")
    assert len(train_ids) == len(train) == record["splits"]["train"]["tokens"]
    assert record["splits"]["train"]["unknown"] == 0
    assert record["tokenization"]["characters"] == len(set(train) - {"\n"})  # the newline is </s>
    dict_txt = (tmp_path / "out" / "dict.txt").read_text(encoding="utf-8")
    assert "<U+00A0> " in dict_txt and "<U+0009> " in dict_txt and "<U+000D> " in dict_txt
    for split in ("valid", "test"):
        ids, _ = read_split(tmp_path / "out", split)
        text = split_text(bucket, split)
        unknown = sum(text.count(c) for c in ONLY_HELD_OUT)
        assert int(ids.eq(dictionary.unk()).sum()) == unknown == record["splits"][split]["unknown"]
        assert record["splits"][split]["unknown_characters"]["U+03A9 Ω"] == text.count("Ω")
        assert record["splits"][split]["unknown_characters"]["U+2028 <U+2028>"] == text.count("\u2028")
        held_out = text
        for char in ONLY_HELD_OUT:
            held_out = held_out.replace(char, "\N{REPLACEMENT CHARACTER}")
        assert decode(ids, dictionary, "characters") == held_out.encode("utf-8")
    books = (tmp_path / "out" / "books.tsv").read_text().splitlines()
    assert len(books) == 1 + 12 + 3 + 3
    first = bucket / "train" / "10.txt"
    assert (
        books[1]
        == f"train\ttrain/10.txt\t{first.stat().st_size}\t{hashlib.md5(first.read_bytes()).hexdigest()}\t3000"
    )


def test_drop_newlines(tmp_path, bucket):
    record = prepare_pg19(Pg19Config(out=tmp_path / "out", source=str(bucket), newlines="drop", workers=1))
    ids, dictionary = read_split(tmp_path / "out", "train")
    train = split_text(bucket, "train")
    assert not ids.eq(dictionary.eos()).any()
    assert decode(ids, dictionary, "characters") == train.replace("\n", "").encode("utf-8")
    assert record["splits"]["train"]["tokens"] == len(train) - train.count("\n")


def test_parallel_workers_write_the_same_files(tmp_path, bucket):
    prepare_pg19(Pg19Config(out=tmp_path / "one", source=str(bucket), workers=1))
    prepare_pg19(Pg19Config(out=tmp_path / "two", source=str(bucket), workers=2))
    for name in ("dict.txt", "train.bin", "train.idx", "valid.bin", "test.bin", "books.tsv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_http_bucket_gives_the_same_data(tmp_path, bucket):
    """The bucket served over HTTP (paginated JSON listing, MD5-checked downloads) = the local copy."""
    www = tmp_path / "www"
    www.mkdir()
    bucket.rename(www / "deepmind-gutenberg")
    server = FakeServer(www)
    try:
        source = f"{server.url}/deepmind-gutenberg"
        downloads = tmp_path / "downloads"
        prepare_pg19(Pg19Config(out=tmp_path / "http", source=source, download_dir=downloads, workers=1))
        assert len(server.file_requests()) == 12 + 3 + 3
        assert sorted(p.name for p in (downloads / "validation").iterdir()) == ["10.txt", "47.txt", "84.txt"]
        prepare_pg19(Pg19Config(out=tmp_path / "again", source=source, download_dir=downloads, workers=1))
        assert len(server.file_requests()) == 12 + 3 + 3  # books already downloaded are not fetched again
        requests = len(server.requests)
        prepare_pg19(Pg19Config(out=tmp_path / "http", source=source, download_dir=downloads, workers=1))
        assert len(server.requests) == requests  # finished data: nothing to list, download or write
    finally:
        server.close()
    prepare_pg19(Pg19Config(out=tmp_path / "local", source=str(www / "deepmind-gutenberg"), workers=1))
    for name in ("dict.txt", "train.bin", "valid.bin", "test.bin", "books.tsv"):
        assert (tmp_path / "http" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_bucket_addresses():
    for source in ("gs://deepmind-gutenberg", BUCKET, BUCKET + "/"):
        bucket = open_bucket(source)
        assert isinstance(bucket, GcsBucket)
        assert bucket.url == "https://storage.googleapis.com/deepmind-gutenberg"
        assert bucket.api == "https://storage.googleapis.com/storage/v1/b/deepmind-gutenberg/o"
    assert isinstance(open_bucket("file:///tmp"), LocalBucket)
    with pytest.raises(PrepareError, match="no such directory"):
        open_bucket("/nonexistent/pg19")


def test_wrong_md5_from_the_bucket(tmp_path, bucket):
    www = tmp_path / "www"
    www.mkdir()
    bucket.rename(www / "deepmind-gutenberg")
    server = FakeServer(www)
    server.wrong_md5 = {"test/47.txt"}
    try:
        with pytest.raises(
            PrepareError, match=r"(?s)1 of 18 books could not be downloaded.*test/47.txt: MD5"
        ):
            prepare_pg19(
                Pg19Config(
                    out=tmp_path / "out",
                    source=f"{server.url}/deepmind-gutenberg",
                    download_dir=tmp_path / "dl",
                )
            )
    finally:
        server.close()
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "dl" / "test" / "47.txt").exists()


def test_max_books(tmp_path, bucket):
    record = prepare_pg19(Pg19Config(out=tmp_path / "out", source=str(bucket), max_books=2, workers=1))
    assert {split: stats["books"] for split, stats in record["splits"].items()} == {
        "train": 2,
        "valid": 2,
        "test": 2,
    }
    ids, dictionary = read_split(tmp_path / "out", "train")
    first_two = (bucket / "train" / "10.txt").read_bytes() + (bucket / "train" / "47.txt").read_bytes()
    assert decode(ids, dictionary, "characters") == first_two


def test_bad_books(tmp_path, bucket):
    (bucket / "validation" / "47.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(
        PrepareError, match=r"validation/47.txt is not UTF-8 \(byte 3.*--encoding-errors replace"
    ):
        prepare_pg19(Pg19Config(out=tmp_path / "out", source=str(bucket), workers=2))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    record = prepare_pg19(
        Pg19Config(out=tmp_path / "out", source=str(bucket), encoding_errors="replace", workers=1)
    )
    assert record["splits"]["valid"]["unknown_characters"]["U+FFFD \N{REPLACEMENT CHARACTER}"] == 1
    for path in (bucket / "test").iterdir():
        path.unlink()
    with pytest.raises(PrepareError, match="test/ folder of .* has no books"):
        prepare_pg19(Pg19Config(out=tmp_path / "other", source=str(bucket), workers=1))


def test_memory_does_not_grow_with_the_number_of_books(tmp_path):
    """Books are streamed: the peak of Python allocations for 100 books is that of 10 books (each 60 KB)."""
    peaks = {}
    for count in (10, 100):
        source = make_bucket(tmp_path / f"bucket{count}", books=(count, 2, 2), length=60_000, seed=count)
        tracemalloc.start()
        prepare_pg19(Pg19Config(out=tmp_path / f"out{count}", source=str(source), workers=1))
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # 100 books are 6 MB of text (24 MB as code points): holding them would show
    assert peaks[100] < peaks[10] + 1_000_000, peaks


def test_command_line(tmp_path, bucket):
    done = run_script("prepare_pg19.py", "--source", bucket, "--workers", 2, "--out", tmp_path / "out")
    assert "characters in train" in done.stdout
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["splits"]["valid"]["unknown"] > 0
    failed = run_script(
        "prepare_pg19.py", "--source", tmp_path / "nowhere", "--out", tmp_path / "x", check=False
    )
    assert failed.returncode == 2 and "error: --source" in failed.stderr and "Traceback" not in failed.stderr
