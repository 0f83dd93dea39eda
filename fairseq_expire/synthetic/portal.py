"""Multi-Room Portal (paper 5.2, Figure 5; A.2.2), as sequence prediction of an agent that remembers perfectly.

Rooms 1..R-1 each have two doors of different colours (drawn from red, green, blue, yellow); in every episode one
door of each room is correct, at random. The correct door leads to the next room, the wrong one back to room 1;
passing the correct door of room R-1 reaches room R, the goal, and ends the episode, as does reaching
``--max-visits`` door attempts (paper: 50 rooms, 1000 steps).

An episode is the line ``episode`` then one line per room visit: ``room_<r> <left colour> <right colour>
go_<colour> pass|fail``. The agent tries a random door the first time it is in a room; afterwards it always
takes the correct one: the door it passed, or the other door after a failure. The scored answers are these
attempts in re-entered rooms (chance: 50%, the room shows both colours); first attempts are unscored. The agent
never fails twice in a room, so the paper's "two mistakes in the same room" end never happens.
"""

from dataclasses import dataclass

import numpy as np

from fairseq_expire.cli import option

from .common import Chunk, EpisodicTask, SyntheticDataError, register_generator

COLOURS = ("red", "green", "blue", "yellow")
VISIT_TOKENS = 5


@dataclass
class PortalConfig:
    rooms: int = option(50, "rooms including the goal room; all but the goal have doors")
    max_visits: int = option(1000, "door attempts after which an episode stops")


@register_generator("portal", PortalConfig)
class PortalTask(EpisodicTask):
    """Multi-Room Portal (Figure 5): take the correct door of every room entered again in an episode."""

    def check(self):
        if self.config.rooms < 2:
            raise SyntheticDataError(
                f"--rooms must be at least 2 (one room with doors and the goal), got {self.config.rooms}"
            )
        if self.config.max_visits < 1:
            raise SyntheticDataError(f"--max-visits must be at least 1, got {self.config.max_visits}")

    @property
    def door_rooms(self) -> int:
        return self.config.rooms - 1

    def symbols(self):
        rooms = [f"room_{r}" for r in range(1, self.door_rooms + 1)]
        return ["episode"] + rooms + list(COLOURS) + [f"go_{c}" for c in COLOURS] + ["pass", "fail"]

    def min_split_tokens(self):
        most_visits = self.door_rooms * (self.door_rooms + 3) // 2  # every first attempt wrong
        return 1 + VISIT_TOKENS * min(self.config.max_visits, most_visits)

    def mean_episode_tokens(self):
        mean_visits = self.door_rooms * (self.door_rooms + 5) / 4  # room r costs 1 + r/2 visits on average
        return 1 + VISIT_TOKENS * min(self.config.max_visits, mean_visits)

    def sample_episodes(self, rng, count):
        shape = (count, self.door_rooms)
        left = rng.integers(len(COLOURS), size=shape)
        right = (left + rng.integers(1, len(COLOURS), size=shape)) % len(COLOURS)
        left_correct = rng.integers(2, size=shape).astype(bool)
        return {
            "left": left,
            "right": right,
            "correct": np.where(left_correct, left, right),
            "wrong": np.where(left_correct, right, left),
            "first_try_fails": rng.integers(2, size=shape).astype(bool),
        }

    def block_visits(self, episodes) -> np.ndarray:
        """Visits caused by the first arrival in each room: the attempt, and after a failure the way back from
        room 1 to this room (rooms 1..r again)."""
        return 1 + episodes["first_try_fails"] * np.arange(1, self.door_rooms + 1)

    def episode_lengths(self, episodes):
        visits = np.minimum(self.block_visits(episodes).sum(axis=1), self.config.max_visits)
        return 1 + VISIT_TOKENS * visits

    def render(self, rng, episodes):
        v = self.vocab
        count, rooms = episodes["left"].shape
        blocks = self.block_visits(episodes).ravel()
        block = np.repeat(np.arange(count * rooms), blocks)
        step_in_block = np.arange(len(block)) - np.repeat(np.cumsum(blocks) - blocks, blocks)
        episode = block // rooms
        first_visit = step_in_block == 0
        room = np.where(first_visit, block % rooms, step_in_block - 1)
        per_episode = blocks.reshape(count, rooms).sum(axis=1)
        visit_index = np.arange(len(block)) - np.repeat(np.cumsum(per_episode) - per_episode, per_episode)
        kept = visit_index < self.config.max_visits
        episode, room, first_visit, visit_index = (
            episode[kept],
            room[kept],
            first_visit[kept],
            visit_index[kept],
        )

        def door(name):
            return episodes[name][episode, room]

        fails = first_visit & episodes["first_try_fails"][episode, room]
        attempt = np.where(fails, door("wrong"), door("correct"))
        colour, go = v.indices(COLOURS), v.indices([f"go_{c}" for c in COLOURS])
        rows = np.stack(
            [
                v.indices([f"room_{r}" for r in range(1, rooms + 1)])[room],
                colour[door("left")],
                colour[door("right")],
                go[attempt],
                np.where(fails, v["fail"], v["pass"]),
            ],
            axis=1,
        )
        lengths = self.episode_lengths(episodes)
        starts = np.cumsum(lengths) - lengths
        tokens = np.empty(int(lengths.sum()), dtype=np.int64)
        tokens[starts] = v["episode"]
        positions = starts[episode] + 1 + VISIT_TOKENS * visit_index
        tokens[positions[:, None] + np.arange(VISIT_TOKENS)] = rows
        labels = np.full_like(tokens, v.ignore)
        labels[positions[~first_visit] + 3] = go[attempt[~first_visit]]
        line_lengths = np.full(count + len(episode), VISIT_TOKENS)
        visits = (lengths - 1) // VISIT_TOKENS
        line_lengths[np.arange(count) + np.cumsum(visits) - visits] = 1
        return Chunk(tokens, labels, line_lengths)
