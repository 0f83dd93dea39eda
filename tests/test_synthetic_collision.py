"""Colliding objects: an independent checker replays the collisions from the rasterized frames and recomputes
every answer; the walk itself is checked against the paper's rule (velocities change only at walls)."""

import numpy as np
import pytest
from test_synthetic_common import generate, read_split

from fairseq_expire.synthetic import collision
from fairseq_expire.synthetic.collision import Particle

COLOURS = ["red", "green", "blue", "yellow", "purple"]


def quadrant(x, y, grid=16):
    return f"quad_{2 * (x >= grid // 2) + (y >= grid // 2)}"


def check_collision(tokens, labels):
    """Replay the frames; return the share of questions about the latest collision's colours and of particle
    colour changes."""
    assert len(tokens) % 9 == 0
    last = {}  # colour pair (in colour order) -> quadrant of its latest collision
    latest_pair, about_latest, colour_changes, previous_colours = None, 0, 0, None
    steps = len(tokens) // 9
    for step in range(steps):
        frame, frame_labels = tokens[9 * step : 9 * step + 9], labels[9 * step : 9 * step + 9]
        x1, y1, x2, y2 = int(frame[0][1:]), int(frame[1][1:]), int(frame[2][1:]), int(frame[3][1:])
        assert [frame[0][0], frame[1][0], frame[2][0], frame[3][0]] == ["x", "y", "x", "y"]
        assert all(0 <= v < 16 for v in (x1, y1, x2, y2))
        colours = (frame[4], frame[5])
        if previous_colours is not None:
            colour_changes += (colours[0] != previous_colours[0]) + (colours[1] != previous_colours[1])
        previous_colours = colours
        if (x1, y1) == (x2, y2):
            latest_pair = tuple(sorted(colours, key=COLOURS.index))
            last[latest_pair] = quadrant(x1, y1)
        asked = (frame[6][4:], frame[7][4:])
        assert frame[6].startswith("ask_") and COLOURS.index(asked[0]) <= COLOURS.index(asked[1])
        about_latest += asked == latest_pair
        assert frame[8] == "?" and frame_labels[:8] == ["_"] * 8
        assert frame_labels[8] == last.get(asked, "_")
    return about_latest / steps, colour_changes / (2 * (steps - 1))


@pytest.mark.parametrize("seed, chunk_tokens", [(1, collision.CHUNK_TOKENS), (2, 9 * 700)])
def test_answers_are_the_quadrant_of_the_last_collision_of_the_asked_colours(
    tmp_path, monkeypatch, seed, chunk_tokens
):
    monkeypatch.setattr(collision, "CHUNK_TOKENS", chunk_tokens)  # small chunks: the history carries over
    out = generate(tmp_path, "collision", {"grid_size": 16}, sizes=(360000, 36000, 36000), seed=seed)
    for split in ("valid", "test"):
        check_collision(*read_split(out, split))
    about_latest, colour_changes = check_collision(*read_split(out, "train"))
    # 40% ask about the latest collision on purpose, a few more by chance (1 in 25 to 2 in 25 of the rest).
    assert 0.40 < about_latest < 0.50
    assert 0.045 < colour_changes < 0.055


def check_collision_easy(tokens, labels):
    """Replay the frames of the colourless variant; return the number of collisions."""
    assert len(tokens) % 8 == 0
    collisions = []  # quadrants, oldest first
    previous = None  # the shared cell at the previous step, if any
    for step in range(len(tokens) // 8):
        frame, frame_labels = tokens[8 * step : 8 * step + 8], labels[8 * step : 8 * step + 8]
        first, second = (int(frame[0][1:]), int(frame[1][1:])), (int(frame[2][1:]), int(frame[3][1:]))
        shared = first if first == second else None
        if shared is not None and shared != previous:  # a collision lasting several steps counts once
            collisions.append(quadrant(*shared))
        previous = shared
        assert frame[5:] == ["?"] * 3 and frame_labels[:5] == ["_"] * 5
        latest = collisions[::-1][:3] + ["_"] * (3 - len(collisions[-3:]))
        if frame[4] == "ask_last":
            assert frame_labels[5:] == [latest[0], "_", "_"]
        else:
            assert frame[4] == "ask_last3" and frame_labels[5:] == latest
    return len(collisions)


@pytest.mark.parametrize("chunk_tokens", [collision.CHUNK_TOKENS, 8 * 700])
def test_easy_answers_are_the_quadrants_of_the_latest_collisions(tmp_path, monkeypatch, chunk_tokens):
    monkeypatch.setattr(collision, "CHUNK_TOKENS", chunk_tokens)
    out = generate(tmp_path, "collision_easy", {"grid_size": 16}, sizes=(160000, 32000, 32000))
    for split in ("valid", "test"):
        check_collision_easy(*read_split(out, split))
    assert check_collision_easy(*read_split(out, "train")) > 20


def test_particles_change_velocity_only_at_walls_and_stay_inside():
    particle = Particle(np.random.default_rng(0), grid_size=16, speed=0.5)
    start = np.array(particle.position)
    positions = np.concatenate([start[None], particle.walk(3000), particle.walk(5000)])
    assert ((positions > 0) & (positions < 15)).all()
    velocities = np.diff(positions, axis=0)
    changed = np.abs(velocities[1:] - velocities[:-1]).max(axis=1) > 1e-9
    straight_on = positions[1:-1] + velocities[:-1]
    leaves = ((straight_on <= 0) | (straight_on >= 15)).any(axis=1)
    assert (changed == leaves).all() and leaves.sum() > 100
    assert 0.45 < np.abs(velocities).mean() / (0.5 * np.sqrt(2 / np.pi)) < 1.6
