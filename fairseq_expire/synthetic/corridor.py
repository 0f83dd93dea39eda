"""Corridor (paper 5.2, Figure 3 left), as sequence prediction: see a red or blue object, walk down a corridor,
then go through the door of the object's colour.

Episode (one raw-text line): ``object_<c>``, then one navigation token per corridor cell (``forward``, ``left``,
``right`` or ``wait``, uniformly at random: observations that carry nothing about the answer, which a model
should let expire), then ``doors`` (the agent reaches the two doors) and the answer ``door_<c>``, the only scored
token. Corridor lengths are uniform in [``--min-length``, ``--max-length``] (paper A.2.2: U(3, 200)); the object
is red or blue with equal chance, so chance accuracy is 50%.

Episodes follow one another in one stream. With ``--episode-gap G``, each episode's line starts with G unscored
``gap`` tokens: at G >= L + R (``--max-span`` plus ``--expire-span-ramp``) nothing of the previous episode can
still be in memory when an episode starts, as in the paper, where every RL episode starts with an empty memory.
Without a gap, a memory older than the block has no position term (paper 4.2), so the previous episode's object,
kept as long as the longest corridor needs, is told from the current one by content only.
"""

from dataclasses import dataclass

import numpy as np

from fairseq_expire.cli import option

from .common import Chunk, EpisodicTask, SyntheticDataError, register_generator

COLOURS = ("red", "blue")
MOVES = ("forward", "left", "right", "wait")
GAP = "gap"


@dataclass
class CorridorConfig:
    min_length: int = option(3, "shortest corridor, in navigation tokens (paper: 3)")
    max_length: int = option(200, "longest corridor, in navigation tokens (paper: 200)")
    episode_gap: int = option(
        0,
        "unscored 'gap' tokens before each episode (0: episodes back to back, as before). At least L + R "
        "(--max-span plus --expire-span-ramp: 216 with the paper's 200 and 16) empties the memory between "
        "episodes, as the paper's RL episodes start",
    )


@register_generator("corridor", CorridorConfig)
class CorridorTask(EpisodicTask):
    """Corridor (Figure 3 left): take the door of the colour seen before a corridor of 3 to 200 steps."""

    def check(self):
        self.check_range("min_length", "max_length")
        if self.config.episode_gap < 0:
            raise SyntheticDataError(f"--episode-gap must be 0 or more tokens, got {self.config.episode_gap}")

    def recipe(self):
        """Without a gap, the recipe of the data made before ``--episode-gap`` existed (the same bytes): such a
        directory is still found finished, not refused as made with other options."""
        recipe = super().recipe()
        if recipe["episode_gap"] == 0:
            del recipe["episode_gap"]
        return recipe

    def symbols(self):
        """The gap has a symbol of its own, added only with a gap (data without one is as before): the time
        between episodes is no part of the environment. Filled with ``wait``, it would read as more corridor, a
        navigation observation of no episode; a symbol of its own leaves every episode exactly the paper's and
        lets a model tell the break from the walk."""
        symbols = [f"object_{c}" for c in COLOURS] + list(MOVES) + ["doors"] + [f"door_{c}" for c in COLOURS]
        return symbols + [GAP] if self.config.episode_gap > 0 else symbols

    def min_split_tokens(self):
        return self.config.episode_gap + self.config.max_length + 3

    def mean_episode_tokens(self):
        return self.config.episode_gap + (self.config.min_length + self.config.max_length) / 2 + 3

    def sample_episodes(self, rng, count):
        return {
            "colour": rng.integers(len(COLOURS), size=count),
            "length": rng.integers(self.config.min_length, self.config.max_length + 1, size=count),
        }

    def episode_lengths(self, episodes):
        return self.config.episode_gap + episodes["length"] + 3

    def render(self, rng, episodes):
        v = self.vocab
        gap = self.config.episode_gap
        lengths = self.episode_lengths(episodes)
        ends = np.cumsum(lengths)
        starts = ends - lengths + gap  # the object, after the gap
        tokens = v.indices(MOVES)[rng.integers(len(MOVES), size=int(ends[-1]))]
        if gap:
            tokens[(starts[:, None] - gap + np.arange(gap)).ravel()] = v[GAP]
        tokens[starts] = v.indices([f"object_{c}" for c in COLOURS])[episodes["colour"]]
        tokens[ends - 2] = v["doors"]
        answers = v.indices([f"door_{c}" for c in COLOURS])[episodes["colour"]]
        tokens[ends - 1] = answers
        labels = np.full_like(tokens, v.ignore)
        labels[ends - 1] = answers
        return Chunk(tokens, labels, lengths)
