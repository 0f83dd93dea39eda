"""Receiving and executing instructions (paper 5.2, Figure 3 right, Table 4), LIGHT-like.

The paper builds this task from LIGHT game logs, which are not available here: the templates and vocabulary
below are ours, modelled on the paper's description. The text is a stream of sentences (one raw-text line each):

- distractors: small scenes (``the baker polishes the lantern .``, ``a crow runs past the tower .``...);
- receiving: ``the <speaker> asks : can you tell the <X> that the <Y> wants to see them ?``;
- a character showing up: ``the <X> is here .``, always answered by ``you tell the <X> : the <Y> wants to see
  you !`` when an instruction for X is waiting (executing it), else by ``you greet the <X> .``.

Scored: ``tell``/``greet`` (was an instruction for X waiting? about 50/50 by design) and ``<Y>`` in executions.
Each sentence slot is a presence with probability C/D (a uniform character of the C), a new instruction with
probability C/(2D) (for a character with none waiting), else a distractor, with D = ``--mean-delay``: a
character then shows up every D sentences on average, so executions come about D sentences after their
instruction (paper: around 950 distractors), and about C/2 instructions are queued at any time.
"""

from dataclasses import dataclass
from typing import Dict, List

import numpy as np

from fairseq_expire.cli import option

from .common import Chunk, SyntheticDataError, SyntheticTask, register_generator

CHARACTERS = (
    "butler baker guard knight priest merchant farmer hunter sailor smith weaver miller jester healer scribe "
    "cook archer shepherd mason tailor innkeeper fisher potter minstrel herbalist steward squire carpenter "
    "brewer ranger"
).split()
FIELDS = {
    "object": "lantern bucket sword loaf rope barrel candle map shield basket key cloak".split(),
    "adj": "old dusty shiny heavy small broken warm strange".split(),
    "place": "kitchen stable courtyard chapel market tower cellar garden harbor tavern".split(),
    "verb": "takes drops polishes inspects carries hides mends counts".split(),
    "action": "laughs sighs yawns sings waits coughs nods sleeps".split(),
    "animal": "cat dog rat goose horse crow".split(),
}
DISTRACTORS = (
    "the {char} {verb} the {object} .",
    "you see a {adj} {object} .",
    "the {char} says : the {object} is {adj} .",
    "you walk to the {place} .",
    "the {char} {action} .",
    "a {animal} runs past the {place} .",
)
RECEIVE = "the {speaker} asks : can you tell the {x} that the {y} wants to see them ?"
PRESENCE = "the {x} is here ."
TELL = "you tell the {x} : the {y} wants to see you !"
GREET = "you greet the {x} ."
LONGEST = max(len(t.split()) for t in DISTRACTORS + (RECEIVE, PRESENCE, TELL, GREET))
SLOTS_PER_CHUNK = 1 << 17
MEAN_SLOT_TOKENS = 6
DISTRACTOR, SHOWS_UP, RECEIVES = 0, 1, 2


@dataclass
class InstructionConfig:
    characters: int = option(20, f"number of characters (at most {len(CHARACTERS)})")
    mean_delay: int = option(950, "mean number of sentences between an instruction and its execution")


@register_generator("instruction", InstructionConfig)
class InstructionTask(SyntheticTask):
    """Instructions (Figure 3 right; our templates, LIGHT-like): execute queued instructions when due."""

    def check(self):
        c = self.config
        if not 2 <= c.characters <= len(CHARACTERS):
            raise SyntheticDataError(
                f"--characters must be between 2 and {len(CHARACTERS)}, got {c.characters}"
            )
        if c.mean_delay < 3 * c.characters:
            raise SyntheticDataError(
                f"--mean-delay {c.mean_delay} is too short for {c.characters} characters: each must show up once "
                f"every {c.mean_delay} sentences, which leaves too few distractors; use --mean-delay >= "
                f"{3 * c.characters} or fewer --characters"
            )

    def symbols(self):
        words: List[str] = []
        for template in DISTRACTORS + (RECEIVE, PRESENCE, TELL, GREET):
            words += [w for w in template.split() if not w.startswith("{")]
        return (
            list(dict.fromkeys(words))
            + CHARACTERS[: self.config.characters]
            + [w for values in FIELDS.values() for w in values]
        )

    @property
    def names(self) -> np.ndarray:
        """Vocabulary indices of the characters in play."""
        return self.vocab.indices(CHARACTERS[: self.config.characters])

    def min_split_tokens(self):
        return max(len(RECEIVE.split()), len(PRESENCE.split()) + len(TELL.split()))

    def chunks(self, rng, num_tokens):
        characters = self.config.characters
        shows_up = characters / self.config.mean_delay
        receives = shows_up / 2
        waiting = [-1] * characters  # per character, who wants to see them (-1: no instruction)
        remaining = num_tokens
        while True:
            slots = int(min(SLOTS_PER_CHUNK, remaining / MEAN_SLOT_TOKENS + 1))
            draw = rng.random(slots)
            kind = np.where(
                draw < shows_up, SHOWS_UP, np.where(draw < shows_up + receives, RECEIVES, DISTRACTOR)
            )
            who = rng.integers(characters, size=slots)
            pick = rng.random(slots)
            others = rng.integers(characters - 1, size=(slots, 2))
            x, y, speaker = who.copy(), np.full(slots, -1), np.zeros(slots, dtype=np.int64)
            for slot in np.flatnonzero(kind != DISTRACTOR).tolist():
                if kind[slot] == SHOWS_UP:
                    y[slot], waiting[x[slot]] = waiting[x[slot]], -1
                    continue
                free = [c for c in range(characters) if waiting[c] < 0]
                if not free:
                    kind[slot] = DISTRACTOR
                    continue
                x[slot] = free[int(pick[slot] * len(free))]
                y[slot], speaker[slot] = others[slot] + (others[slot] >= x[slot])
                waiting[x[slot]] = y[slot]
            chunk, slot_tokens = self.render(rng, kind, x, y, speaker)
            fit = int(np.searchsorted(np.cumsum(slot_tokens), remaining, side="right"))
            if fit == 0:
                return
            if fit < slots:  # the split ends inside this batch: keep its first whole slots
                lines = int(np.sum(1 + (kind[:fit] == SHOWS_UP)))
                tokens = int(slot_tokens[:fit].sum())
                chunk = Chunk(chunk.tokens[:tokens], chunk.labels[:tokens], chunk.line_lengths[:lines])
            yield chunk
            remaining -= len(chunk.tokens)
            if fit < slots:
                return

    def render(self, rng, kind, x, y, speaker):
        """The lines of every slot, and the number of tokens of each slot."""
        v = self.vocab
        lines_per_slot = 1 + (kind == SHOWS_UP)
        first_line = np.cumsum(lines_per_slot) - lines_per_slot
        tokens = np.full((int(lines_per_slot.sum()), LONGEST), -1)
        labels = np.full_like(tokens, v.ignore)

        distractor = np.flatnonzero(kind == DISTRACTOR)
        template = rng.integers(len(DISTRACTORS), size=len(distractor))
        for t, text in enumerate(DISTRACTORS):
            chosen = distractor[template == t]
            self.fill(rng, tokens, first_line[chosen], text, {})
        receive = np.flatnonzero(kind == RECEIVES)
        self.fill(
            rng,
            tokens,
            first_line[receive],
            RECEIVE,
            {"x": x[receive], "y": y[receive], "speaker": speaker[receive]},
        )
        presence = np.flatnonzero(kind == SHOWS_UP)
        self.fill(rng, tokens, first_line[presence], PRESENCE, {"x": x[presence]})
        for text, slots in ((TELL, presence[y[presence] >= 0]), (GREET, presence[y[presence] < 0])):
            line = first_line[slots] + 1
            self.fill(rng, tokens, line, text, {"x": x[slots], "y": y[slots]})
            labels[line, 1] = tokens[line, 1]
            if text == TELL:
                labels[line, 6] = self.names[y[slots]]

        line_lengths = (tokens >= 0).sum(axis=1)
        slot_tokens = np.add.reduceat(line_lengths, first_line)
        real = tokens >= 0
        return Chunk(tokens[real], labels[real], line_lengths), slot_tokens

    def fill(self, rng, tokens: np.ndarray, lines: np.ndarray, template: str, people: Dict[str, np.ndarray]):
        """Write ``template`` on ``lines``: ``{x}``, ``{y}``, ``{speaker}`` from ``people`` (character numbers),
        ``{char}`` a random character, other fields random words of their kind."""
        v, names = self.vocab, self.names
        for column, word in enumerate(template.split()):
            if not word.startswith("{"):
                tokens[lines, column] = v[word]
            elif word[1:-1] in people:
                tokens[lines, column] = names[people[word[1:-1]]]
            elif word == "{char}":
                tokens[lines, column] = names[rng.integers(len(names), size=len(lines))]
            else:
                kind = v.indices(FIELDS[word[1:-1]])
                tokens[lines, column] = kind[rng.integers(len(kind), size=len(lines))]
