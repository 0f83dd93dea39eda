"""scripts/prepare_wikitext103.py on a tiny fake wikitext-103-v1.zip: mirror fallbacks, checksum, the real
fairseq-preprocess, and clear errors for bad zips."""

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from fairseq.data import Dictionary, data_utils
from test_prepare_download import FakeServer, run_script

from fairseq_expire.prepare.download import DownloadError
from fairseq_expire.prepare.output import PrepareError
from fairseq_expire.prepare.wikitext103 import Wikitext103Config, prepare_wikitext103

TEXT = {
    "train": " \n = Valkyria Chronicles = \n \n the game was released in Japan . \n the <unk> sat on the mat . \n",
    "valid": " \n = Robert Boulter = \n \n the actor was born in Japan . \n",
    "test": " \n = Tower = \n \n the tower fell down . \n",
}


def make_zip(path: Path, members=("train", "valid", "test")) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("wikitext-103/", "")
        for split in members:
            archive.writestr(f"wikitext-103/wiki.{split}.tokens", TEXT[split] * 3)
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_mirrors_checksum_and_fairseq_preprocess(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    zip_path = make_zip(www / "wikitext-103-v1.zip")
    server = FakeServer(www)
    try:
        urls = [
            f"{server.url}/dead/wikitext-103-v1.zip",
            f"file://{tmp_path}/none.zip",
            f"{server.url}/wikitext-103-v1.zip",
        ]
        done = run_script(
            "prepare_wikitext103.py",
            "--urls", *urls,
            "--md5", md5(zip_path),
            "--download-dir", tmp_path / "dl",
            "--workers", 1,
            "--out", tmp_path / "out",
        )  # fmt: skip
    finally:
        server.close()
    tried = [
        line.split("downloading ")[1].split(" to ")[0]
        for line in done.stdout.splitlines()
        if "downloading " in line
    ]
    assert tried == urls  # the dead mirrors were tried first, in order
    assert (tmp_path / "dl" / "wikitext-103-v1.zip").read_bytes() == zip_path.read_bytes()
    out = tmp_path / "out"
    record = json.loads((out / "prepare.json").read_text())
    assert (out / "preprocess.log").exists() and not list(out.glob("*.tokens"))
    dictionary = Dictionary.load(str(out / "dict.txt"))
    train_words = {w for line in TEXT["train"].splitlines() for w in line.split()}
    assert set(dictionary.symbols[dictionary.nspecial :]) - {
        f"madeupword{i:04d}" for i in range(8)
    } == train_words - {"<unk>"}
    for split, text in TEXT.items():
        lines = (text * 3).splitlines()
        dataset = data_utils.load_indexed_dataset(str(out / split), dictionary, "mmap")
        assert len(dataset) == len(lines)  # fairseq-preprocess: one item per line, each ending in </s>
        ids = torch.cat([dataset[i] for i in range(len(dataset))])
        words = [w for line in lines for w in line.split()]
        assert len(ids) == len(words) + len(lines) == record["splits"][split]["tokens"]
        unknown = sum(w not in train_words or w == "<unk>" for w in words)
        assert int(ids.eq(dictionary.unk()).sum()) == unknown == record["splits"][split]["unknown"]
    assert record["source"]["zip_md5"] == md5(zip_path)


def test_wrong_checksum_and_bad_zips(tmp_path):
    zip_path = make_zip(tmp_path / "w.zip")
    with pytest.raises(PrepareError, match=f"has MD5 {md5(zip_path)}, not {'0' * 32}"):
        prepare_wikitext103(Wikitext103Config(out=tmp_path / "out", zip=zip_path, md5="0" * 32))
    with pytest.raises(DownloadError, match=f"w.zip: MD5 {md5(zip_path)}, expected {'0' * 32}"):
        prepare_wikitext103(
            Wikitext103Config(
                out=tmp_path / "out", urls=[str(zip_path)], download_dir=tmp_path / "dl", md5="0" * 32
            )
        )
    partial = make_zip(tmp_path / "partial.zip", members=("train", "valid"))
    with pytest.raises(PrepareError, match="not wikitext-103-v1.zip .*wiki.test.tokens"):
        prepare_wikitext103(Wikitext103Config(out=tmp_path / "out", zip=partial, md5=md5(partial)))
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(zip_path.read_bytes()[:200])
    with pytest.raises(PrepareError, match="not a complete zip file"):
        prepare_wikitext103(Wikitext103Config(out=tmp_path / "out", zip=truncated, md5=md5(truncated)))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert not list((tmp_path / "dl").iterdir())
