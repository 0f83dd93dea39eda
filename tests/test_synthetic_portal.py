"""Portal task: an independent checker replays every episode, learning each room's door from the outcomes."""

import pytest
from test_synthetic_common import generate, read_split

from fairseq_expire.synthetic import common


def check_portal(tokens, labels, rooms, max_visits):
    """Replay the stream; return the share of first attempts that failed, the number of scored answers, and how
    many episodes reached the goal and how many stopped after ``max_visits``."""
    assert tokens[0] == "episode"
    first_failures, first_attempts, scored, reached_goal, stopped = 0, 0, 0, 0, 0
    i = 0
    while i < len(tokens):
        assert tokens[i] == "episode" and labels[i] == "_"
        i += 1
        correct, doors = {}, {}  # what the episode has shown about each room
        room, visits = 1, 0
        while i < len(tokens) and tokens[i] != "episode":
            seen, left, right, attempt, outcome = tokens[i : i + 5]
            assert seen == f"room_{room}" and left != right and attempt[3:] in (left, right)
            assert doors.setdefault(room, (left, right)) == (left, right)  # doors stay for the episode
            assert labels[i : i + 3] == ["_"] * 3 and labels[i + 4] == "_"
            if room in correct:  # re-entered: the agent must know the door
                assert attempt == labels[i + 3] == f"go_{correct[room]}" and outcome == "pass"
                scored += 1
            else:
                assert labels[i + 3] == "_"
                first_attempts += 1
                first_failures += outcome == "fail"
            passed = attempt[3:] if outcome == "pass" else (left if attempt[3:] == right else right)
            assert outcome in ("pass", "fail") and correct.setdefault(room, passed) == passed
            room = room + 1 if outcome == "pass" else 1
            visits += 1
            i += 5
            if room == rooms:
                reached_goal += 1
                break
        assert visits <= max_visits and (room == rooms or visits == max_visits)
        stopped += room != rooms
    return first_failures / first_attempts, scored, reached_goal, stopped


@pytest.mark.parametrize("seed, chunk_tokens", [(1, common.CHUNK_TOKENS), (5, 2000)])
def test_re_entered_rooms_are_answered_with_the_door_learned_before(
    tmp_path, monkeypatch, seed, chunk_tokens
):
    monkeypatch.setattr(common, "CHUNK_TOKENS", chunk_tokens)  # episodes sampled a few at a time
    out = generate(tmp_path, "portal", {"rooms": 12, "max_visits": 60}, sizes=(80000, 8000, 8000), seed=seed)
    for split in ("valid", "test"):
        check_portal(*read_split(out, split), 12, 60)
    failing, scored, reached_goal, stopped = check_portal(*read_split(out, "train"), 12, 60)
    assert 0.45 < failing < 0.55 and scored > 5000  # first tries are coin flips
    assert reached_goal > 0 and stopped > 0  # some episodes end at the goal, others after 60 visits


def test_paper_sized_episodes(tmp_path):
    out = generate(tmp_path, "portal", {"rooms": 50, "max_visits": 1000}, sizes=(60000, 6000, 6000))
    _, _, reached_goal, _ = check_portal(*read_split(out, "train"), 50, 1000)
    assert reached_goal > 0
