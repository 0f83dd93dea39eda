"""scripts/prepare_text.py: the split rules, the three tokenizations (bytes, chars, sentencepiece), their round trips,
bad input, and training on the result with the real fairseq-train."""

from pathlib import Path

import pytest
import sentencepiece
import torch
from console import json_logs, run, train_command
from fairseq.data import Dictionary, data_utils
from test_prepare_download import run_script

from fairseq_expire.prepare.output import PrepareError
from fairseq_expire.prepare.text import SentencePieceVocabulary, TextConfig, prepare_text
from fairseq_expire.prepare.vocab import decode

LICENSES = Path("/usr/share/common-licenses")


def english_text() -> bytes:
    """Plain English present on every Debian machine (/usr/share/common-licenses), about 100 KB."""
    return b"".join((LICENSES / name).read_bytes() for name in ("GPL-3", "LGPL-2.1", "Apache-2.0"))


@pytest.fixture
def corpus(tmp_path):
    text = english_text()
    half = text.index(b"\n", len(text) // 2) + 1
    (tmp_path / "a.txt").write_bytes(text[:half])
    (tmp_path / "b.txt").write_bytes(text[half:])
    return [tmp_path / "a.txt", tmp_path / "b.txt"], text


def read_split(directory: Path, split: str):
    dictionary = Dictionary.load(str(directory / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(directory / split), dictionary, "mmap")
    return torch.cat([dataset[i] for i in range(len(dataset))]), dictionary


def split_bytes(record: dict, split: str) -> bytes:
    return b"".join(
        Path(path).read_bytes()[begin:end] for path, begin, end in record["splits"][split]["pieces"]
    )


def test_fraction_split_cuts_at_line_starts(tmp_path, corpus):
    files, text = corpus
    record = prepare_text(
        TextConfig(
            out=tmp_path / "out", input=files, tokenizer="bytes", valid_fraction=0.1, test_fraction=0.2
        )
    )
    parts = [split_bytes(record, split) for split in ("train", "valid", "test")]
    assert b"".join(parts) == text
    cut_valid, cut_test = len(parts[0]), len(parts[0]) + len(parts[1])
    for cut, share in ((cut_valid, 0.7), (cut_test, 0.8)):
        position = round(share * len(text))  # the cut is the first line start at or after it:
        assert text[cut - 1] == ord("\n") and b"\n" not in text[position - 1 : cut - 1]
    for split, part in zip(("train", "valid", "test"), parts):
        ids, dictionary = read_split(tmp_path / "out", split)
        assert decode(ids, dictionary, "bytes") == part  # exact round trip, newlines as </s>
        assert record["splits"][split]["tokens"] == len(part)


def test_split_by_files_and_chars_round_trip(tmp_path, corpus):
    files, text = corpus
    (tmp_path / "c.txt").write_text("Ünïcödé ✓ only in test\n", encoding="utf-8")
    record = prepare_text(
        TextConfig(
            out=tmp_path / "out", train=files, valid=[files[1]], test=[tmp_path / "c.txt"], tokenizer="chars"
        )
    )
    ids, dictionary = read_split(tmp_path / "out", "train")
    assert decode(ids, dictionary, "characters") == text
    assert record["tokenization"]["characters"] == len(set(text.decode()) - {"\n"})
    ids, _ = read_split(tmp_path / "out", "test")
    unknown = {c for c in "Ünïcödé ✓ only in test" if c not in text.decode()}
    assert len(unknown) >= 3  # each once
    assert record["splits"]["test"]["unknown"] == int(ids.eq(dictionary.unk()).sum()) == len(unknown)
    assert record["splits"]["test"]["unknown_characters"]["U+00F6 ö"] == 1


def test_drop_newlines(tmp_path, corpus):
    files, text = corpus
    for tokenizer, unit in (("bytes", "bytes"), ("chars", "characters")):
        out = tmp_path / tokenizer
        record = prepare_text(TextConfig(out=out, input=files, tokenizer=tokenizer, newlines="drop"))
        ids, dictionary = read_split(out, "train")
        assert not ids.eq(dictionary.eos()).any()
        assert decode(ids, dictionary, unit) == split_bytes(record, "train").replace(b"\n", b"")


def test_sentencepiece_trained_on_train_only(tmp_path):
    words = "the cat sat on a mat and then the dog ran far away from home".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(5 + i % 4)) for i in range(400)]
    (tmp_path / "train.txt").write_text("\n".join(lines[:300]) + "\n")
    (tmp_path / "valid.txt").write_text("\n".join(lines[300:350]) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(lines[350:]) + "\nzebra quokka\n")  # letters train never had
    record = prepare_text(
        TextConfig(
            out=tmp_path / "out",
            train=[tmp_path / "train.txt"],
            valid=[tmp_path / "valid.txt"],
            test=[tmp_path / "test.txt"],
            tokenizer="spm",
            spm_vocab_size=25,
        )
    )
    vocab = SentencePieceVocabulary((tmp_path / "out" / "spm.model").read_bytes(), "eos")
    for split in ("train", "valid", "test"):
        ids, dictionary = read_split(tmp_path / "out", split)
        assert dictionary.symbols == vocab.dictionary.symbols
        assert int(ids.eq(dictionary.eos()).sum()) == len(
            (tmp_path / f"{split}.txt").read_text().splitlines()
        )
    assert vocab.decode(read_split(tmp_path / "out", "valid")[0]) == "\n".join(lines[300:350]) + "\n"
    assert record["splits"]["train"]["unknown"] == 0
    assert record["splits"]["test"]["unknown"] > 0  # z, b, q, k were not in train
    model = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "out" / "spm.model"))
    assert model.get_piece_size() == 25 == record["tokenization"]["pieces"]


def test_bad_input(tmp_path, corpus):
    files, _ = corpus
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(PrepareError, match="the train split of .*empty.txt is empty: the text is empty"):
        prepare_text(TextConfig(out=tmp_path / "out", input=[empty]))
    with pytest.raises(PrepareError, match="the test files .*empty.txt.* are empty"):
        prepare_text(TextConfig(out=tmp_path / "out", train=files, valid=files, test=[empty]))
    with pytest.raises(PrepareError, match="either --input FILES .* or --train"):
        prepare_text(TextConfig(out=tmp_path / "out", input=files, train=files))
    with pytest.raises(PrepareError, match="needs --valid and --test too"):
        prepare_text(TextConfig(out=tmp_path / "out", train=files))
    with pytest.raises(PrepareError, match="missing.txt: no such file"):
        prepare_text(TextConfig(out=tmp_path / "out", input=[tmp_path / "missing.txt"]))
    with pytest.raises(PrepareError, match="each must be above 0 and together below 1"):
        prepare_text(TextConfig(out=tmp_path / "out", input=files, valid_fraction=0.5, test_fraction=0.5))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(files[0].read_bytes() + "café\n".encode("latin-1"))
    size = files[0].stat().st_size
    with pytest.raises(PrepareError, match=rf"latin1.txt is not UTF-8 \(near byte {size + 3:,}"):
        prepare_text(
            TextConfig(out=tmp_path / "out", train=[latin1], valid=files, test=files, tokenizer="chars")
        )
    with pytest.raises(PrepareError, match="lower --spm-vocab-size"):
        prepare_text(TextConfig(out=tmp_path / "out", input=files, tokenizer="spm", spm_vocab_size=100_000))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    prepare_text(TextConfig(out=tmp_path / "out", train=[latin1], valid=files, test=files, tokenizer="bytes"))
    with pytest.raises(PrepareError, match="cannot create the output directory"):
        prepare_text(TextConfig(out=latin1 / "out", input=files))


def test_rerun_is_skipped_until_the_text_changes(tmp_path, corpus):
    files, text = corpus
    config = TextConfig(out=tmp_path / "out", input=files, tokenizer="bytes")
    first = prepare_text(config)
    assert prepare_text(config) == first
    with open(files[1], "ab") as handle:
        handle.write(b"one more line\n")
    again = prepare_text(config)
    assert sum(s["tokens"] for s in again["splits"].values()) == len(text) + len(b"one more line\n")
    with pytest.raises(PrepareError, match="tokenizer: 'bytes' there, 'chars' now.*--force"):
        prepare_text(TextConfig(out=tmp_path / "out", input=files, tokenizer="chars"))


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["bytes", "chars", "spm"])
def test_fairseq_train_trains_on_it(tmp_path, corpus, tokenizer):
    files, _ = corpus
    out = tmp_path / "data"
    run_script(
        "prepare_text.py", "--input", *files, "--tokenizer", tokenizer, "--spm-vocab-size", 300, "--out", out
    )
    save_dir = tmp_path / "checkpoints"
    result = run("fairseq-train", *train_command(out, save_dir, updates=2, block=32, batch=4))
    logs = result.stdout + result.stderr
    train, valid = json_logs(logs, "train"), json_logs(logs, "valid")
    assert int(train[-1]["train_num_updates"]) == 2 and float(train[-1]["train_loss"]) > 0
    assert float(valid[-1]["valid_loss"]) > 0  # the valid split is read too
    assert (save_dir / "checkpoint_last.pt").exists()


def test_command_line_errors(tmp_path):
    failed = run_script(
        "prepare_text.py", "--input", tmp_path / "nothing.txt", "--out", tmp_path / "out", check=False
    )
    assert failed.returncode == 2
    assert "error: " in failed.stderr and "nothing.txt: no such file" in failed.stderr
    assert "Traceback" not in failed.stderr
    usage = run_script("prepare_text.py", "--tokenizer", "words", "--out", tmp_path / "out", check=False)
    assert usage.returncode == 2 and "invalid choice: 'words'" in usage.stderr
