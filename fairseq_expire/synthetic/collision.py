"""Colliding Objects (paper 5.3 and A.2.3, Table 3) and its easy variant without colours (A.1.4, Table 6).

Two particles move on a ``--grid-size`` grid (16). Each starts at a uniform position inside it with a Gaussian
velocity (standard deviation ``--speed`` per axis). Every step a particle adds its velocity to its position;
while that would leave the open square (0, grid - 1), its velocity is first drawn again. The rasterized location
of a particle is its position rounded to the nearest cell (half to even). A collision is a step at which both
particles are in the same cell; it does not change their movement. One split is one continuous simulation.

``collision``: particles have one of ``--colours`` colours (5); every step each one changes, with probability
``--colour-change`` (0.05), to another colour. A step is 9 tokens: ``x<i> y<j>`` of particle 1 and of particle 2,
their colours, a question of two colours ``ask_<a> ask_<b>`` (in colour order) and the answer slot ``?``, whose
label is the quadrant of the last collision (this step included) between particles of colours {a, b}, in
either order: ``quad_<2 * (x >= grid/2) + (y >= grid/2)>``; unscored while no such collision has happened. A
question asks about the colours of the latest collision with probability ``--last-collision-questions`` (0.4,
once a collision has happened), else about the colours of two random particles.

``collision_easy``: no colours. A step is 8 tokens: the two locations, a question ``ask_last`` or ``ask_last3``
(equally likely) and three answer slots ``? ? ?``. The slots hold the quadrants of the latest, second latest and
third latest collision; ``ask_last`` scores the first slot only, ``ask_last3`` all three (the paper's "label
mapping of the last 3 collisions"). Here a collision that lasts several steps in the same cell counts once.

Where the paper is vague we follow the authors' generator (public repository facebookresearch/
transformer-sequential): speed 0.5, walls at 0 and grid - 1, rounding, one question per step, colour changes
after the move. We differ on purpose in four places: the answer is a hidden slot (the authors kept answers out of
the input too; a visible answer would let a model copy the previous answer to the same question), colour pairs
are unordered, a colour change always gives another colour, and the 8-token step of the paper gains the slot.
"""

import math
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import numpy as np

from fairseq_expire.cli import option

from .common import CHUNK_TOKENS, Chunk, SyntheticDataError, SyntheticTask, register_generator

COLOUR_NAMES = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
NORMALS_PER_DRAW = 4096


@dataclass
class CollisionEasyConfig:
    grid_size: int = option(16, "side of the square grid, in cells (paper: 16)")
    speed: float = option(0.5, "standard deviation of each velocity component")


@dataclass
class CollisionConfig(CollisionEasyConfig):
    colours: int = option(5, f"number of particle colours (paper: 5, at most {len(COLOUR_NAMES)})")
    colour_change: float = option(0.05, "chance per step that a particle changes colour")
    last_collision_questions: float = option(
        0.4, "share of questions about the colours of the latest collision (paper: 0.4)"
    )


class Particle:
    """One particle's walk; velocities change only at walls, so the walk is computed segment by segment (one
    Python iteration per straight segment, not per step)."""

    def __init__(self, rng: np.random.Generator, grid_size: int, speed: float):
        self.rng = rng
        self.limit = float(grid_size - 1)
        self.speed = speed
        self.normals: List[float] = []
        self.position = [float(x) for x in rng.random(2) * self.limit]
        self.velocity = self.draw_velocity()

    def draw_velocity(self) -> List[float]:
        if len(self.normals) < 2:
            self.normals = (self.rng.standard_normal(NORMALS_PER_DRAW) * self.speed).tolist()
        return [self.normals.pop(), self.normals.pop()]

    def walk(self, num_steps: int) -> np.ndarray:
        """Positions (num_steps x 2) after each of the next steps. A position ``k`` steps into a straight segment
        is ``start + k * velocity``, the same float expression here and in the returned array."""
        limit = self.limit
        (x, y), (vx, vy) = self.position, self.velocity
        starts, velocities, lengths = [], [], []
        done = 0
        while done < num_steps:
            while not (0.0 < x + vx < limit and 0.0 < y + vy < limit):
                vx, vy = self.draw_velocity()
            most = steps = num_steps - done
            for p, v in ((x, vx), (y, vy)):  # the last step before a wall, up to float rounding
                if v > 0:
                    steps = min(steps, math.ceil((limit - p) / v) - 1)
                elif v < 0:
                    steps = min(steps, math.ceil(p / -v) - 1)
            steps = max(steps, 1)
            while steps > 1 and not (0.0 < x + steps * vx < limit and 0.0 < y + steps * vy < limit):
                steps -= 1
            while steps < most and 0.0 < x + (steps + 1) * vx < limit and 0.0 < y + (steps + 1) * vy < limit:
                steps += 1
            starts.append((x, y))
            velocities.append((vx, vy))
            lengths.append(steps)
            x, y = x + steps * vx, y + steps * vy
            done += steps
        self.position, self.velocity = [x, y], [vx, vy]
        lengths = np.array(lengths)
        along = np.arange(1, num_steps + 1) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return np.repeat(np.array(starts), lengths, axis=0) + along[:, None] * np.repeat(
            np.array(velocities), lengths, axis=0
        )


class ParticleSimulation:
    """Cells and quadrants of the two particles, chunk after chunk of one continuous simulation."""

    def __init__(self, rng: np.random.Generator, grid_size: int, speed: float):
        self.grid_size = grid_size
        self.particles = [Particle(child, grid_size, speed) for child in rng.spawn(2)]

    def cells(self, num_steps: int) -> np.ndarray:
        """Rasterized locations, num_steps x 2 particles x (x, y)."""
        return np.stack([np.rint(p.walk(num_steps)).astype(np.int64) for p in self.particles], axis=1)

    def quadrant(self, cell: np.ndarray) -> np.ndarray:
        return 2 * (cell[..., 0] >= self.grid_size / 2) + (cell[..., 1] >= self.grid_size / 2)


def check_grid(config):
    if config.grid_size < 4:
        raise SyntheticDataError(f"--grid-size must be at least 4, got {config.grid_size}")
    if (
        not 0 < config.speed <= config.grid_size / 2
    ):  # faster particles would mostly draw velocities that leave
        raise SyntheticDataError(
            f"--speed must be positive and at most half the grid size ({config.grid_size / 2}), got {config.speed}"
        )


def location_symbols(grid_size: int) -> List[str]:
    return [f"x{i}" for i in range(grid_size)] + [f"y{i}" for i in range(grid_size)]


def location_tokens(vocab, grid_size: int, cells: np.ndarray) -> np.ndarray:
    """x1 y1 x2 y2 of each step (num_steps x 4)."""
    xs = vocab.indices([f"x{i}" for i in range(grid_size)])
    ys = vocab.indices([f"y{i}" for i in range(grid_size)])
    return np.stack([xs[cells[:, 0, 0]], ys[cells[:, 0, 1]], xs[cells[:, 1, 0]], ys[cells[:, 1, 1]]], axis=1)


def last_before(times: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Index in the sorted ``times`` of the last one <= each of ``at``, -1 where none."""
    return np.searchsorted(times, at, side="right") - 1


@register_generator("collision", CollisionConfig)
class CollisionTask(SyntheticTask):
    """Colliding Objects (Table 3): the quadrant of the last collision of two asked colours."""

    STEP_TOKENS = 9

    def check(self):
        c = self.config
        check_grid(c)
        if not 2 <= c.colours <= len(COLOUR_NAMES):
            raise SyntheticDataError(f"--colours must be between 2 and {len(COLOUR_NAMES)}, got {c.colours}")
        for name in ("colour_change", "last_collision_questions"):
            if not 0 <= getattr(c, name) <= 1:
                raise SyntheticDataError(
                    f"--{name.replace('_', '-')} is a probability, got {getattr(c, name)}"
                )

    def symbols(self):
        colours = COLOUR_NAMES[: self.config.colours]
        return (
            location_symbols(self.config.grid_size)
            + list(colours)
            + [f"ask_{c}" for c in colours]
            + ["?"]
            + [f"quad_{q}" for q in range(4)]
        )

    def min_split_tokens(self):
        return self.STEP_TOKENS

    def chunks(self, rng, num_tokens) -> Iterator[Chunk]:
        c = self.config
        simulation = ParticleSimulation(rng, c.grid_size, c.speed)
        colours = rng.integers(c.colours, size=2)
        last_pair = -1  # colour pair of the latest collision
        last_quadrant = np.full(c.colours * c.colours, -1)  # per pair a * colours + b (a <= b)
        remaining = num_tokens // self.STEP_TOKENS
        while remaining > 0:
            steps = min(remaining, CHUNK_TOKENS // self.STEP_TOKENS)
            remaining -= steps
            cells = simulation.cells(steps)
            changes = (rng.random((steps, 2)) < c.colour_change) * rng.integers(1, c.colours, size=(steps, 2))
            colour = (colours + np.cumsum(changes, axis=0)) % c.colours
            colours = colour[-1]
            pair = colour.min(axis=1) * c.colours + colour.max(axis=1)
            collided = np.flatnonzero((cells[:, 0] == cells[:, 1]).all(axis=1))
            quadrant = simulation.quadrant(cells[:, 0])

            asked_colours = np.sort(rng.integers(c.colours, size=(steps, 2)), axis=1)
            asked = asked_colours[:, 0] * c.colours + asked_colours[:, 1]
            latest = last_before(collided, np.arange(steps))
            latest_pair = np.full(steps, last_pair)
            latest_pair[latest >= 0] = pair[collided[latest[latest >= 0]]]
            about_latest = (rng.random(steps) < c.last_collision_questions) & (latest_pair >= 0)
            asked = np.where(about_latest, latest_pair, asked)

            answer = last_quadrant[asked]
            for p in np.unique(pair[collided]):
                times = collided[pair[collided] == p]
                which = asked == p
                before = last_before(times, np.flatnonzero(which))
                answer[which] = np.where(before >= 0, quadrant[times[np.maximum(before, 0)]], answer[which])
                last_quadrant[p] = quadrant[times[-1]]
            if len(collided):
                last_pair = pair[collided[-1]]
            yield self.render(cells, colour, asked, answer)

    def render(self, cells, colour, asked, answer) -> Chunk:
        v, n = self.vocab, self.config.colours
        colour_tokens = v.indices(COLOUR_NAMES[:n])
        ask_tokens = v.indices([f"ask_{c}" for c in COLOUR_NAMES[:n]])
        quads = v.indices([f"quad_{q}" for q in range(4)])
        steps = len(cells)
        tokens = np.concatenate(
            [
                location_tokens(v, self.config.grid_size, cells),
                colour_tokens[colour],
                ask_tokens[np.stack([asked // n, asked % n], axis=1)],
                np.full((steps, 1), v["?"]),
            ],
            axis=1,
        )
        labels = np.full_like(tokens, v.ignore)
        labels[:, -1] = np.where(answer >= 0, quads[np.maximum(answer, 0)], v.ignore)
        return Chunk(tokens.ravel(), labels.ravel(), np.full(steps, self.STEP_TOKENS))


@register_generator("collision_easy", CollisionEasyConfig)
class CollisionEasyTask(SyntheticTask):
    """Colliding Objects without colours (Table 6): the quadrants of the latest collisions."""

    STEP_TOKENS = 8
    REMEMBERED = 3

    def check(self):
        check_grid(self.config)

    def symbols(self):
        return (
            location_symbols(self.config.grid_size)
            + ["ask_last", "ask_last3", "?"]
            + [f"quad_{q}" for q in range(4)]
        )

    def min_split_tokens(self):
        return self.STEP_TOKENS

    def chunks(self, rng, num_tokens) -> Iterator[Chunk]:
        simulation = ParticleSimulation(rng, self.config.grid_size, self.config.speed)
        history = np.full(self.REMEMBERED, -1)  # quadrants of the latest collisions, oldest first
        previous: Tuple[bool, np.ndarray] = (False, np.full(2, -1))  # together at the last step, and where
        remaining = num_tokens // self.STEP_TOKENS
        while remaining > 0:
            steps = min(remaining, CHUNK_TOKENS // self.STEP_TOKENS)
            remaining -= steps
            cells = simulation.cells(steps)
            together = (cells[:, 0] == cells[:, 1]).all(axis=1)
            was_together = np.concatenate([[previous[0]], together[:-1]])
            prior_cell = np.concatenate([previous[1][None], cells[:-1, 0]])
            starts = together & ~(was_together & (cells[:, 0] == prior_cell).all(axis=1))
            previous = (bool(together[-1]), cells[-1, 0])
            quadrants = np.concatenate([history, simulation.quadrant(cells[starts, 0])])
            seen = len(history) + np.cumsum(starts)  # collisions known after each step, with the history
            answers = np.stack([quadrants[seen - 1 - k] for k in range(self.REMEMBERED)], axis=1)
            history = quadrants[-self.REMEMBERED :]
            ask_three = rng.random(steps) < 0.5
            answers[~ask_three, 1:] = -1
            yield self.render(cells, ask_three, answers)

    def render(self, cells, ask_three, answers) -> Chunk:
        v = self.vocab
        steps = len(cells)
        quads = v.indices([f"quad_{q}" for q in range(4)])
        tokens = np.concatenate(
            [
                location_tokens(v, self.config.grid_size, cells),
                np.where(ask_three, v["ask_last3"], v["ask_last"])[:, None],
                np.full((steps, self.REMEMBERED), v["?"]),
            ],
            axis=1,
        )
        labels = np.full_like(tokens, v.ignore)
        labels[:, -self.REMEMBERED :] = np.where(answers >= 0, quads[np.maximum(answers, 0)], v.ignore)
        return Chunk(tokens.ravel(), labels.ravel(), np.full(steps, self.STEP_TOKENS))
