"""Extremely Long Copy (paper 5.3, Table 1): a run of A's far in the past, then only B's; at the cue ``?`` the
model must write as many A's as the run had, then stop with ``.``.

Episode (one raw-text line): ``A``*n ``B``*gap ``?`` ``A``*n ``.``. The run length n follows a geometric law
(P(n = k) = 2^-k, capped at ``--max-run``), whose stopping chance is 1/2 after every A whatever was written so
far: a model that cannot see the run scores 50% at best. Scored: the copied A's after the first one (every run
has at least one A, so the first copied A is given by the cue and not scored) and the final ``.``.
"""

from dataclasses import dataclass

import numpy as np

from fairseq_expire.cli import option

from .common import Chunk, EpisodicTask, SyntheticDataError, register_generator, segments


@dataclass
class CopyConfig:
    min_gap: int = option(1024, "fewest B's between the run of A's and the cue (the memory span needed)")
    max_gap: int = option(16384, "most B's between the run and the cue; the paper goes up to 128K (131072)")
    max_run: int = option(16, "longest run of A's (run lengths are geometric, mean 2)")


@register_generator("copy", CopyConfig)
class CopyTask(EpisodicTask):
    """Extremely Long Copy (Table 1): write as many A's as a run seen up to 128K tokens earlier."""

    def check(self):
        self.check_range("min_gap", "max_gap")
        if self.config.max_run < 1:
            raise SyntheticDataError(f"--max-run must be at least 1, got {self.config.max_run}")

    def symbols(self):
        return ["A", "B", "?", "."]

    def min_split_tokens(self):
        return 2 * self.config.max_run + self.config.max_gap + 2

    def mean_episode_tokens(self):
        return 2 * 2 + (self.config.min_gap + self.config.max_gap) / 2 + 2

    def sample_episodes(self, rng, count):
        return {
            "run": np.minimum(rng.geometric(0.5, size=count), self.config.max_run),
            "gap": rng.integers(self.config.min_gap, self.config.max_gap + 1, size=count),
        }

    def episode_lengths(self, episodes):
        return 2 * episodes["run"] + episodes["gap"] + 2

    def render(self, rng, episodes):
        run, gap = episodes["run"], episodes["gap"]
        ones = np.ones_like(run)
        v = self.vocab
        tokens = segments(
            np.broadcast_to(v.indices(["A", "B", "?", "A", "."]), (len(run), 5)),
            np.stack([run, gap, ones, run, ones], axis=1),
        )
        labels = segments(
            np.broadcast_to(v.indices(["_", "A", "."]), (len(run), 3)),
            np.stack([run + gap + 2, run - 1, ones], axis=1),
        )
        return Chunk(tokens, labels, self.episode_lengths(episodes))
