"""Instruction task: an independent checker reads every sentence, keeps the queue of instructions and
recomputes each response to a character showing up."""

import pytest
from test_synthetic_common import generate, read_split

from fairseq_expire.synthetic import instruction


def sentences(tokens, labels):
    start = 0
    for end, token in enumerate(tokens):
        if token in (".", "?", "!"):
            yield tokens[start : end + 1], labels[start : end + 1]
            start = end + 1
    assert start == len(tokens)


def check_instruction(tokens, labels):
    """Replay the sentences; return the delays (in sentences, a response counted with its presence) between
    receiving and executing, the number of greetings, and the longest queue."""
    waiting, delays, greetings, longest = {}, [], 0, 0
    responding = None  # the character who just showed up
    count = 0
    for words, word_labels in sentences(tokens, labels):
        if responding is not None:
            x = responding
            if x in waiting:
                y, since = waiting.pop(x)
                assert words == f"you tell the {x} : the {y} wants to see you !".split()
                assert word_labels == ["_", "tell", "_", "_", "_", "_", y, "_", "_", "_", "_", "_"]
                delays.append(count - since)
            else:
                assert words == f"you greet the {x} .".split() and word_labels == [
                    "_",
                    "greet",
                    "_",
                    "_",
                    "_",
                ]
                greetings += 1
            responding = None
            continue
        count += 1
        assert set(word_labels) == {"_"}
        if words[2:4] == ["asks", ":"]:
            assert words[:2] == ["the", words[1]] and words[4:7] == ["can", "you", "tell"]
            x, y = words[8], words[11]
            assert (
                words
                == f"the {words[1]} asks : can you tell the {x} that the {y} wants to see them ?".split()
            )
            assert x not in waiting and x != y
            waiting[x] = (y, count)
            longest = max(longest, len(waiting))
        elif words[2:] == ["is", "here", "."]:
            responding = words[1]
        else:
            assert not {"here", "tell", "greet", "asks"} & set(words)  # distractors never look like the task
    return delays, greetings, longest


@pytest.mark.parametrize("seed, slots_per_chunk", [(1, instruction.SLOTS_PER_CHUNK), (3, 500)])
def test_instructions_are_executed_when_their_character_shows_up(
    tmp_path, monkeypatch, seed, slots_per_chunk
):
    monkeypatch.setattr(
        instruction, "SLOTS_PER_CHUNK", slots_per_chunk
    )  # small chunks: the queue carries over
    out = generate(
        tmp_path, "instruction", {"characters": 4, "mean_delay": 40}, sizes=(150000, 8000, 8000), seed=seed
    )
    for split in ("valid", "test"):
        check_instruction(*read_split(out, split))
    delays, greetings, longest = check_instruction(*read_split(out, "train"))
    assert 35 < sum(delays) / len(delays) < 45  # --mean-delay 40
    assert 0.4 < len(delays) / (len(delays) + greetings) < 0.6  # tell or greet: about 50/50
    assert longest >= 3  # several instructions queue up


def test_paper_sized_delays(tmp_path):
    out = generate(
        tmp_path, "instruction", {"characters": 20, "mean_delay": 950}, sizes=(400000, 20000, 20000)
    )
    delays, _, longest = check_instruction(*read_split(out, "train"))
    assert 700 < sum(delays) / len(delays) < 1200 and longest > 5
