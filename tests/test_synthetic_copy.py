"""Copy task: an independent checker re-reads every episode and recomputes what must be copied and scored."""

import pytest
from test_synthetic_common import generate, read_split


def check_copy(tokens, labels, min_gap, max_gap, max_run):
    """Walk the stream episode by episode; return (run lengths, scored labels)."""
    runs, scored = [], []
    i = 0
    while i < len(tokens):
        run = 0
        while tokens[i] == "A":
            run, i = run + 1, i + 1
        gap = 0
        while tokens[i] == "B":
            gap, i = gap + 1, i + 1
        assert 1 <= run <= max_run and min_gap <= gap <= max_gap
        assert tokens[i] == "?"
        assert all(label == "_" for label in labels[i - run - gap : i + 1])
        i += 1
        for k in range(run + 1):  # the copy: run A's then the stop
            expected = "A" if k < run else "."
            assert tokens[i + k] == expected
            assert labels[i + k] == ("_" if k == 0 else expected)  # the first A is implied by the cue
            if k:
                scored.append(expected)
        i += run + 1
        runs.append(run)
    return runs, scored


@pytest.mark.parametrize("seed", [1, 2])
def test_every_copy_is_the_run_and_only_the_copy_is_scored(tmp_path, seed):
    options = {"min_gap": 3, "max_gap": 60, "max_run": 6}
    out = generate(tmp_path, "copy", options, sizes=(60000, 3000, 3000), seed=seed)
    for split in ("valid", "test"):
        check_copy(*read_split(out, split), **options)
    runs, scored = check_copy(*read_split(out, "train"), **options)
    # Geometric runs: after every copied A, stopping is a coin flip, so a model without memory gets 50%.
    assert 0.45 < scored.count(".") / len(scored) < 0.55
    assert max(runs) == 6 and 1.8 < sum(runs) / len(runs) < 2.2


def test_gaps_are_as_asked_up_to_128k(tmp_path):
    out = generate(tmp_path, "copy", {"min_gap": 131072, "max_gap": 131072}, sizes=(400000, 140000, 140000))
    tokens, labels = read_split(out, "train")
    runs, _ = check_copy(tokens, labels, 131072, 131072, 16)
    assert len(runs) == 3 and len(tokens) == sum(2 * run + 131072 + 2 for run in runs)
