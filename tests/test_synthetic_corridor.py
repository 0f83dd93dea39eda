"""Corridor task: an independent checker re-reads every episode and recomputes the door to take."""

import pytest
from test_synthetic_common import generate, read_split

MOVES = {"forward", "left", "right", "wait"}


def check_corridor(tokens, labels, min_length, max_length):
    """Walk the stream episode by episode; return the corridor lengths and the answers."""
    lengths, answers = [], []
    i = 0
    while i < len(tokens):
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
