"""Corridor (paper 5.2, Figure 3 left), as sequence prediction: see a red or blue object, walk down a corridor,
then go through the door of the object's colour.

Episode (one raw-text line): ``object_<c>``, then one navigation token per corridor cell (``forward``, ``left``,
``right`` or ``wait``, uniformly at random: observations that carry nothing about the answer, which a model
should let expire), then ``doors`` (the agent reaches the two doors) and the answer ``door_<c>``, the only scored
token. Corridor lengths are uniform in [``--min-length``, ``--max-length``] (paper A.2.2: U(3, 200)); the object
is red or blue with equal chance, so chance accuracy is 50%.
"""

from dataclasses import dataclass

import numpy as np

from fairseq_expire.cli import option

from .common import Chunk, EpisodicTask, register_generator

COLOURS = ("red", "blue")
MOVES = ("forward", "left", "right", "wait")


@dataclass
class CorridorConfig:
    min_length: int = option(3, "shortest corridor, in navigation tokens (paper: 3)")
    max_length: int = option(200, "longest corridor, in navigation tokens (paper: 200)")


@register_generator("corridor", CorridorConfig)
class CorridorTask(EpisodicTask):
    """Corridor (Figure 3 left): take the door of the colour seen before a corridor of 3 to 200 steps."""

    def check(self):
        self.check_range("min_length", "max_length")

    def symbols(self):
        return [f"object_{c}" for c in COLOURS] + list(MOVES) + ["doors"] + [f"door_{c}" for c in COLOURS]

    def min_split_tokens(self):
        return self.config.max_length + 3

    def mean_episode_tokens(self):
        return (self.config.min_length + self.config.max_length) / 2 + 3

    def sample_episodes(self, rng, count):
        return {
            "colour": rng.integers(len(COLOURS), size=count),
            "length": rng.integers(self.config.min_length, self.config.max_length + 1, size=count),
        }

    def episode_lengths(self, episodes):
        return episodes["length"] + 3

    def render(self, rng, episodes):
        v = self.vocab
        lengths = self.episode_lengths(episodes)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        tokens = v.indices(MOVES)[rng.integers(len(MOVES), size=int(ends[-1]))]
        tokens[starts] = v.indices([f"object_{c}" for c in COLOURS])[episodes["colour"]]
        tokens[ends - 2] = v["doors"]
        answers = v.indices([f"door_{c}" for c in COLOURS])[episodes["colour"]]
        tokens[ends - 1] = answers
        labels = np.full_like(tokens, v.ignore)
        labels[ends - 1] = answers
        return Chunk(tokens, labels, lengths)
