"""scripts/prepare_enwik8.py on small fake enwik8.zip files: split rule, exact round trip, newline modes, bad input,
re-runs. The data is read back with fairseq's own Dictionary.load and data_utils.load_indexed_dataset."""

import hashlib
import json
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from console import run
from fairseq.data import Dictionary, data_utils
from test_prepare_download import FakeServer, run_script

from fairseq_expire.prepare import enwik8
from fairseq_expire.prepare.enwik8 import Enwik8Config, prepare_enwik8, split_bounds
from fairseq_expire.prepare.output import PrepareError
from fairseq_expire.prepare.vocab import decode, symbol_bytes

SIZE = 200_000  # 5% = 10,000 bytes each for valid and test


def fake_enwik8(size: int = SIZE, seed: int = 0) -> bytes:
    """XML-like lines with every byte value somewhere, newlines included."""
    rng = np.random.default_rng(seed)
    words = [bytes(rng.integers(0, 256, rng.integers(1, 12), dtype=np.uint8)) for _ in range(300)]
    words += [b"<page>", b"</page>", b"the", b"[[link]]", b"\n", b"\n", b"\r\n", b" ", b" "]
    data = b" ".join(words[i] for i in rng.integers(0, len(words), size // 3))
    data = bytes(range(256)) + data
    return data[:size]


def make_zip(path: Path, data: bytes, member: str = "enwik8") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, data)
    return path


@pytest.fixture
def enwik8_zip(tmp_path):
    data = fake_enwik8()
    return make_zip(tmp_path / "enwik8.zip", data), data


def config(tmp_path, zip_path, data, **options) -> Enwik8Config:
    return Enwik8Config(out=tmp_path / "out", zip=zip_path, md5=hashlib.md5(data).hexdigest(), **options)


def read_split(directory: Path, split: str):
    dictionary = Dictionary.load(str(directory / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(directory / split), dictionary, "mmap")
    return torch.cat([dataset[i] for i in range(len(dataset))]), dictionary


def assert_nothing_written(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*")), "a temporary directory was left behind"


def test_split_rule_is_the_literature_split_on_the_real_size():
    assert split_bounds(100_000_000) == {
        "train": (0, 90_000_000),
        "valid": (90_000_000, 95_000_000),
        "test": (95_000_000, 100_000_000),
    }
    assert split_bounds(SIZE) == {
        "train": (0, 180_000),
        "valid": (180_000, 190_000),
        "test": (190_000, 200_000),
    }
    assert split_bounds(1000, 10, 30) == {"train": (0, 960), "valid": (960, 970), "test": (970, 1000)}
    with pytest.raises(PrepareError, match="each split needs at least one byte"):
        split_bounds(1000, 500, 500)


def test_eos_mode_round_trips_every_byte(tmp_path, enwik8_zip):
    zip_path, data = enwik8_zip
    record = prepare_enwik8(config(tmp_path, zip_path, data, newlines="eos"))
    out = tmp_path / "out"
    bounds = split_bounds(SIZE)
    for split, (begin, end) in bounds.items():
        ids, dictionary = read_split(out, split)
        assert len(ids) == end - begin == record["splits"][split]["tokens"]
        assert decode(ids, dictionary, "bytes") == data[begin:end]
        assert not ids.eq(dictionary.unk()).any()
        assert int(ids.eq(dictionary.eos()).sum()) == data[begin:end].count(b"\n")
    # every byte value has its own token: nothing can become <unk>
    assert sorted(b for b in symbol_bytes(dictionary, "bytes") if b is not None) == [
        bytes([v]) for v in range(256)
    ]
    assert len(dictionary) % 8 == 0
    assert record["source"]["member_md5"] == hashlib.md5(data).hexdigest()
    assert json.loads((out / "prepare.json").read_text())["splits"]["valid"]["tokens"] == 10_000
    assert "--newlines eos" in (out / "README.md").read_text()


@pytest.mark.slow
def test_eos_mode_equals_the_adaptive_span_recipe(tmp_path, enwik8_zip):
    """fairseq's adaptive-span recipe writes each byte as its decimal value, one text line per enwik8 line, and
    binarizes that with fairseq-preprocess: the same tokens as --newlines eos (plus the </s> fairseq-preprocess
    adds after a split's unfinished last line)."""
    zip_path, data = enwik8_zip
    prepare_enwik8(config(tmp_path, zip_path, data, newlines="eos"))
    begin, end = split_bounds(SIZE)["valid"]
    piece = data[begin:end]
    text = tmp_path / "valid.txt"
    text.write_text(" ".join("\n" if byte == 10 else str(byte) for byte in piece))
    dict_txt = tmp_path / "out" / "dict.txt"
    run(
        "fairseq-preprocess",
        "--only-source",
        "--srcdict",
        dict_txt,
        "--validpref",
        text,
        "--destdir",
        tmp_path / "recipe",
    )
    ours, dictionary = read_split(tmp_path / "out", "valid")
    theirs, _ = read_split(tmp_path / "recipe", "valid")
    assert not piece.endswith(b"\n")
    assert theirs.tolist() == ours.tolist() + [dictionary.eos()]


def test_drop_mode_removes_exactly_the_newlines(tmp_path, enwik8_zip):
    zip_path, data = enwik8_zip
    record = prepare_enwik8(config(tmp_path, zip_path, data, newlines="drop"))
    for split, (begin, end) in split_bounds(SIZE).items():
        ids, dictionary = read_split(tmp_path / "out", split)
        piece = data[begin:end]
        assert len(ids) == len(piece) - piece.count(b"\n") == record["splits"][split]["tokens"]
        assert record["splits"][split]["newlines"] == piece.count(b"\n")
        assert not ids.eq(dictionary.eos()).any()
        assert decode(ids, dictionary, "bytes") == piece.replace(b"\n", b"")


def test_explicit_split_sizes(tmp_path, enwik8_zip):
    zip_path, data = enwik8_zip
    record = prepare_enwik8(
        config(tmp_path, zip_path, data, newlines="eos", valid_bytes=1234, test_bytes=4321)
    )
    assert {s: v["tokens"] for s, v in record["splits"].items()} == {
        "train": SIZE - 1234 - 4321,
        "valid": 1234,
        "test": 4321,
    }
    ids, dictionary = read_split(tmp_path / "out", "test")
    assert decode(ids, dictionary, "bytes") == data[-4321:]


def test_download_from_a_mirror(tmp_path, enwik8_zip):
    zip_path, data = enwik8_zip
    www = tmp_path / "www"
    www.mkdir()
    zip_path.rename(www / "enwik8.zip")
    server = FakeServer(www)
    try:
        urls = [f"{server.url}/gone/enwik8.zip", f"{server.url}/enwik8.zip"]
        prepare_enwik8(config(tmp_path, None, data, download_dir=tmp_path / "dl", urls=urls))
    finally:
        server.close()
    assert (tmp_path / "dl" / "enwik8.zip").read_bytes() == (www / "enwik8.zip").read_bytes()
    ids, dictionary = read_split(tmp_path / "out", "train")
    assert decode(ids, dictionary, "bytes") == data[:180_000].replace(b"\n", b"")  # drop is the default


def test_wrong_checksum(tmp_path, enwik8_zip):
    zip_path, data = enwik8_zip
    with pytest.raises(PrepareError, match=f"has MD5 {hashlib.md5(data).hexdigest()}, not {'0' * 32}"):
        prepare_enwik8(Enwik8Config(out=tmp_path / "out", zip=zip_path, md5="0" * 32))
    assert_nothing_written(tmp_path)


def test_truncated_zip(tmp_path, enwik8_zip):
    zip_path, data = enwik8_zip
    whole = zip_path.read_bytes()
    zip_path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(PrepareError, match="is not a complete zip file"):
        prepare_enwik8(config(tmp_path, zip_path, data))
    assert_nothing_written(tmp_path)


def test_damaged_zip_data(tmp_path, enwik8_zip):
    zip_path, data = enwik8_zip
    damaged = bytearray(zip_path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # inside the compressed member: the CRC (or inflate) fails
    zip_path.write_bytes(bytes(damaged))
    with pytest.raises(PrepareError, match="is damaged"):
        prepare_enwik8(config(tmp_path, zip_path, data))
    assert_nothing_written(tmp_path)


def test_empty_input(tmp_path):
    empty = tmp_path / "enwik8.zip"
    empty.write_bytes(b"")
    with pytest.raises(PrepareError, match="is empty"):
        prepare_enwik8(config(tmp_path, empty, b""))
    make_zip(empty, b"")
    with pytest.raises(PrepareError, match="cannot split 0 bytes"):
        prepare_enwik8(config(tmp_path, empty, b""))
    other = make_zip(tmp_path / "other.zip", b"text", member="readme.txt")
    with pytest.raises(PrepareError, match="no member named 'enwik8' .*readme.txt"):
        prepare_enwik8(config(tmp_path, other, b"text"))
    with pytest.raises(PrepareError, match="no such file"):
        prepare_enwik8(config(tmp_path, tmp_path / "missing.zip", b""))
    assert_nothing_written(tmp_path)


def test_unwritable_output(tmp_path, enwik8_zip):
    zip_path, data = enwik8_zip
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PrepareError, match="cannot create the output directory"):
        prepare_enwik8(Enwik8Config(out=blocker / "out", zip=zip_path, md5=hashlib.md5(data).hexdigest()))


def test_rerun_skips_finished_work_and_redoes_damaged_output(tmp_path, enwik8_zip, caplog):
    zip_path, data = enwik8_zip
    killed = tmp_path / ".out.partial-k1ll3d"  # what a killed run leaves: never mistaken for the data
    killed.mkdir()
    (killed / "train.bin").write_bytes(b"half")
    first = prepare_enwik8(config(tmp_path, zip_path, data))
    assert not killed.exists()
    out = tmp_path / "out"
    stamp = (out / "train.bin").stat().st_mtime_ns
    assert prepare_enwik8(config(tmp_path, zip_path, data)) == first
    assert (out / "train.bin").stat().st_mtime_ns == stamp

    original = (out / "valid.bin").read_bytes()
    (out / "valid.bin").write_bytes(original[:100])  # damaged: detected by size and prepared again
    prepare_enwik8(config(tmp_path, zip_path, data))
    assert (out / "valid.bin").read_bytes() == original
    assert "incomplete or damaged (valid.bin" in caplog.text

    (out / "prepare.json").write_text("{ cut sho")  # an unreadable record: prepared again
    prepare_enwik8(config(tmp_path, zip_path, data))
    assert json.loads((out / "prepare.json").read_text())["files"] == first["files"]

    with pytest.raises(PrepareError, match="newlines: 'drop' there, 'eos' now.*--force"):
        prepare_enwik8(config(tmp_path, zip_path, data, newlines="eos"))
    prepare_enwik8(config(tmp_path, zip_path, data, newlines="eos", force=True))
    assert json.loads((out / "prepare.json").read_text())["recipe"]["newlines"] == "eos"
    assert not list(tmp_path.glob(".out.*"))


def test_existing_directory_of_other_data_is_not_replaced(tmp_path, enwik8_zip):
    zip_path, data = enwik8_zip
    out = tmp_path / "out"
    out.mkdir()
    (out / "dict.txt").write_text("a 1\n")
    with pytest.raises(PrepareError, match="was not made by this script"):
        prepare_enwik8(config(tmp_path, zip_path, data))
    assert (out / "dict.txt").read_text() == "a 1\n"
    prepare_enwik8(config(tmp_path, zip_path, data, force=True))
    assert (out / "prepare.json").exists()


def test_memory_does_not_grow_with_the_file(tmp_path, monkeypatch):
    """The member is streamed: the peak of Python allocations stays flat for a 4x larger file."""
    monkeypatch.setattr(enwik8, "CHUNK_BYTES", 1 << 16)
    peaks = []
    for size in (1_000_000, 4_000_000):
        data = fake_enwik8(size, seed=1)
        zip_path = make_zip(tmp_path / f"{size}.zip", data)
        tracemalloc.start()
        prepare_enwik8(
            Enwik8Config(out=tmp_path / str(size), zip=zip_path, md5=hashlib.md5(data).hexdigest())
        )
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.3 * peaks[0] + 200_000, peaks  # the index of 2048-token items grows a little
    assert peaks[1] < 4_000_000, peaks


def test_command_line(tmp_path, enwik8_zip):
    zip_path, data = enwik8_zip
    md5 = hashlib.md5(data).hexdigest()
    script = "prepare_enwik8.py"
    done = run_script(script, "--zip", zip_path, "--md5", md5, "--newlines", "eos", "--out", tmp_path / "out")
    assert "wrote" in done.stdout
    ids, dictionary = read_split(tmp_path / "out", "valid")
    assert decode(ids, dictionary, "bytes") == data[180_000:190_000]
    failed = run_script(script, "--zip", zip_path, "--out", tmp_path / "out2", check=False)
    assert failed.returncode == 2
    assert f"error: enwik8 in {zip_path} has MD5 {md5}" in failed.stderr
    assert "Traceback" not in failed.stderr
