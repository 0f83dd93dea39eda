"""Corridor task: an independent checker re-reads every episode and recomputes the door to take."""

import hashlib
import json

import pytest
from fairseq.data import Dictionary
from test_synthetic_common import generate, read_split

from fairseq_expire.synthetic import SyntheticDataError

MOVES = {"forward", "left", "right", "wait"}


def check_corridor(tokens, labels, min_length, max_length, gap=0):
    """Walk the stream episode by episode; return the corridor lengths and the answers."""
    lengths, answers = [], []
    i = 0
    while i < len(tokens):
        assert tokens[i : i + gap] == ["gap"] * gap and labels[i : i + gap] == ["_"] * gap  # unscored
        i += gap
        assert tokens[i] in ("object_red", "object_blue") and labels[i] == "_"
        colour = tokens[i].split("_")[1]
        i += 1
        length = 0
        while tokens[i] in MOVES:
            assert labels[i] == "_"
            length, i = length + 1, i + 1
        assert min_length <= length <= max_length
        assert tokens[i] == "doors" and labels[i] == "_"
        assert tokens[i + 1] == labels[i + 1] == f"door_{colour}"
        i += 2
        lengths.append(length)
        answers.append(colour)
    return lengths, answers


@pytest.mark.parametrize("seed", [1, 7])
def test_the_answer_is_the_door_of_the_cue_colour(tmp_path, seed):
    out = generate(
        tmp_path, "corridor", {"min_length": 3, "max_length": 200}, sizes=(100000, 10000, 10000), seed=seed
    )
    for split in ("valid", "test"):
        check_corridor(*read_split(out, split), 3, 200)
    lengths, answers = check_corridor(*read_split(out, "train"), 3, 200)
    assert min(lengths) == 3 and max(lengths) == 200  # U(3, 200), as in the paper
    assert 0.45 < answers.count("red") / len(answers) < 0.55  # chance is 50%


def test_corridor_lengths_are_as_asked(tmp_path):
    out = generate(tmp_path, "corridor", {"min_length": 17, "max_length": 17}, sizes=(2000, 400, 400))
    lengths, _ = check_corridor(*read_split(out, "train"), 17, 17)
    assert lengths == [17] * (2000 // 20)


def test_an_episode_gap_puts_unscored_gap_tokens_before_every_episode(tmp_path):
    """216 = L + R at the paper's L = 200, R = 16: the previous episode is out of reach when the next starts."""
    options = {"min_length": 3, "max_length": 200, "episode_gap": 216}
    out = generate(tmp_path, "corridor", options, sizes=(100000, 5000, 5000))
    for split in ("valid", "test"):
        check_corridor(*read_split(out, split), 3, 200, gap=216)
    tokens, labels = read_split(out, "train")
    lengths, answers = check_corridor(tokens, labels, 3, 200, gap=216)
    assert len(tokens) == sum(lengths) + len(lengths) * (216 + 3)  # gap, object, corridor, doors, answer
    assert labels.count("_") == len(tokens) - len(answers)  # one scored token per episode: its answer
    assert min(lengths) < 20 and max(lengths) > 180 and 0.35 < answers.count("red") / len(answers) < 0.65
    lines = (out / "raw" / "train.txt").read_text().splitlines()  # one line per episode, its gap first
    assert [len(line.split()) for line in lines] == [216 + length + 3 for length in lengths]
    assert all(line.startswith("gap " * 216 + "object_") for line in lines)


def test_without_a_gap_the_data_is_byte_for_byte_what_it_was(tmp_path):
    """Checksums of the data made before --episode-gap existed (same options and seed): no gap symbol in the
    vocabulary, and the same tokens."""
    out = generate(tmp_path, "corridor", {"min_length": 3, "max_length": 30, "episode_gap": 0})
    assert "gap" not in Dictionary.load(str(out / "dict.txt")).symbols
    for name, checksum in (
        ("train.bin", "d95a91d49833882cd89b39af8864287e"),
        ("train.labels.bin", "46db56cb3f081a422d0637dce349f38b"),
        ("valid.bin", "dd48d7bfa4d96f43fdf9860d3dff9603"),
        ("dict.txt", "9a3be269504689e4893339638cafe8b4"),
    ):
        assert hashlib.md5((out / name).read_bytes()).hexdigest() == checksum, name
    assert (
        "episode_gap" not in json.loads((out / "prepare.json").read_text())["recipe"]
    )  # found finished again
    gapped = generate(tmp_path, "corridor", {"min_length": 3, "max_length": 30, "episode_gap": 5}, name="gap")
    assert json.loads((gapped / "prepare.json").read_text())["recipe"]["episode_gap"] == 5
    assert Dictionary.load(str(gapped / "dict.txt")).symbols[-2:] == ["gap", "_"]


def test_a_negative_gap_is_refused_naming_the_option(tmp_path):
    with pytest.raises(SyntheticDataError, match="--episode-gap"):
        generate(tmp_path, "corridor", {"episode_gap": -1})
