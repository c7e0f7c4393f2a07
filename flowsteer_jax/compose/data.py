"""Scenes of the compositional digits world: a 2x2 canvas of coloured scikit-learn digits, GenEval-like prompts.

A scene is a (CANVAS, CANVAS, 3) RGB image in [-1, 1] on black: four CELL x CELL cells (row-major: top left,
top right, bottom left, bottom right), each empty or holding one 8x8 digit at a random offset (`JITTER`) in one
of `COLOURS` (pixel = digit intensity x colour). Digits come from the digits world's fixed split
(`digits.data.split_indices`): training scenes from the training split, reference scenes from the held-out one.

Prompts are GenEval-like tasks (`TASKS`); each names up to two objects (a digit, and where the task says so a
cell or a colour) and implies how many digits the canvas holds; what a prompt leaves open (cells, colours) is
drawn at random, so a prompt has many right images:

- single "a 3"; two "a 3 and a 7"; counting "three copies of 5" (2-4 of one digit);
- colour "a red 3"; position "a 3 top left and a 7 bottom right"; colour binding "a red 3 and a blue 7".

`Spec` holds each prompt's objects as arrays (digit, cell or -1, colour or -1) and its digit count, which is all
`evaluate` needs to score an image against its prompt.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import numpy as np

from flowsteer_jax.digits import data as digits_data

CELL = 12  # a cell's side in pixels (the 8x8 digit plus room to move)
CANVAS = 2 * CELL
IMAGE_SHAPE = (CANVAS, CANVAS, 3)
NUM_CELLS = 4
JITTER = 2  # the digit's offset inside its cell is 1 + U{0..JITTER} pixels on each axis
MAX_OBJECTS = 4  # counting goes up to four
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
# Five digits of distinct shapes and three colours: ~600 prompts (as many as the digits world), few enough for a
# CPU teacher to learn the bindings in minutes; all ten digits x four colours (2,981 prompts) left a width-32
# teacher at chance on digit identity after 2,000 steps.
DIGITS = (0, 1, 3, 4, 7)
# Saturated but not pure primaries, so every colour lights all channels a little (as anti-aliased ink would).
COLOURS = {
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 1.0, 0.15),
    "blue": (0.25, 0.35, 1.0),
}
COLOUR_NAMES = tuple(COLOURS)
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
TASKS = ("single", "two", "counting", "colour", "position", "binding")


class Spec(NamedTuple):
    """Every prompt's content (arrays over prompts, row 0 = the empty prompt, which asks for nothing)."""

    task: np.ndarray  # (P,) index into TASKS, -1 for ""
    count: np.ndarray  # (P,) digits on the canvas
    digit: np.ndarray  # (P, MAX_OBJECTS) the objects' digits, -1 = no object
    cell: np.ndarray  # (P, MAX_OBJECTS) the cell each object must be in, -1 = any
    colour: np.ndarray  # (P, MAX_OBJECTS) the colour each object must have, -1 = any


class Scenes(NamedTuple):
    images: np.ndarray  # (N, CANVAS, CANVAS, 3) float32 in [-1, 1]
    cells: np.ndarray  # (N, NUM_CELLS) digit in each cell, -1 = empty
    colours: np.ndarray  # (N, NUM_CELLS) colour index in each cell, -1 = empty
    prompt_ids: np.ndarray  # (N,) index into `all_prompts()`


def _objects() -> list[tuple[int, str, list[tuple[int, int, int]]]]:
    """(task, prompt, [(digit, cell, colour), ...]) for every prompt, in a fixed order."""
    out = []
    ds = DIGITS
    for d in ds:
        out.append((0, f"a {d}", [(d, -1, -1)]))
    for a, b in itertools.product(ds, ds):
        out.append((1, f"a {a} and a {b}", [(a, -1, -1), (b, -1, -1)]))
    for n, d in itertools.product(COUNT_WORDS, ds):
        out.append((2, f"{COUNT_WORDS[n]} copies of {d}", [(d, -1, -1)] * n))
    for c, d in itertools.product(range(len(COLOURS)), ds):
        out.append((3, f"a {COLOUR_NAMES[c]} {d}", [(d, -1, c)]))
    for a, b in itertools.product(ds, ds):
        for p, q in itertools.permutations(range(NUM_CELLS), 2):
            out.append((4, f"a {a} {POSITIONS[p]} and a {b} {POSITIONS[q]}", [(a, p, -1), (b, q, -1)]))
    for a, b in itertools.product(ds, ds):
        for c, e in itertools.product(range(len(COLOURS)), repeat=2):
            out.append((5, f"a {COLOUR_NAMES[c]} {a} and a {COLOUR_NAMES[e]} {b}", [(a, -1, c), (b, -1, e)]))
    return out


@functools.cache
def all_prompts() -> tuple[str, ...]:
    """Every prompt of the world, "" first (586 in all)."""
    return ("", *(p for _, p, _ in _objects()))


@functools.cache
def spec() -> Spec:
    """The content of every prompt of `all_prompts()` (read-only arrays)."""
    objs = _objects()
    p = len(objs) + 1
    task, count = np.full(p, -1, np.int64), np.zeros(p, np.int64)
    arrays = [np.full((p, MAX_OBJECTS), -1, np.int64) for _ in range(3)]
    for i, (t, _, items) in enumerate(objs, start=1):
        task[i], count[i] = t, len(items)
        for j, item in enumerate(items):
            for array, v in zip(arrays, item, strict=True):
                array[i, j] = v
    out = Spec(task, count, *arrays)
    for a in out:
        a.setflags(write=False)
    return out


@functools.cache
def words() -> tuple[str, ...]:
    """The vocabulary after the special tokens: every word of the prompts, in first-use order."""
    return tuple(dict.fromkeys(w for prompt in all_prompts() for w in prompt.split()))


@functools.cache
def task_prompts() -> tuple[np.ndarray, ...]:
    """For each task, the ids of its prompts."""
    return tuple(np.flatnonzero(spec().task == t) for t in range(len(TASKS)))


def task_ids(tasks: str | tuple[str, ...] | None = None) -> tuple[int, ...]:
    """Indices into `TASKS` of a selection: None or "" = all, else names (a tuple or one comma-separated string)."""
    if not tasks:
        return tuple(range(len(TASKS)))
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    unknown = sorted(set(names) - set(TASKS))
    if unknown or not names:
        raise ValueError(f"unknown tasks {unknown}; choose from {TASKS}")
    return tuple(TASKS.index(t) for t in dict.fromkeys(names))


def sample_prompts(rng: np.random.Generator, n: int, tasks: str | tuple[str, ...] | None = None) -> np.ndarray:
    """`n` prompt ids: a task of the selection (`task_ids`, default all) uniformly (so the 5 single-digit prompts
    are as common as the 400 position prompts put together), then one of its prompts uniformly."""
    by_task, chosen = task_prompts(), task_ids(tasks)
    picks = rng.integers(0, len(chosen), size=n)
    return np.array([by_task[chosen[t]][rng.integers(len(by_task[chosen[t]]))] for t in picks], np.int64)


def layout(rng: np.random.Generator, prompt_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A random scene content for each prompt: (cells, colours), each (N, NUM_CELLS), -1 = empty. Objects with a
    cell go there; the others go to random free cells; unnamed colours are uniform."""
    s = spec()
    n = len(prompt_ids)
    cells, colours = np.full((n, NUM_CELLS), -1, np.int64), np.full((n, NUM_CELLS), -1, np.int64)
    for i, pid in enumerate(prompt_ids):
        digit, cell, colour = s.digit[pid], s.cell[pid], s.colour[pid]
        objects = np.flatnonzero(digit >= 0)
        fixed = set(cell[objects][cell[objects] >= 0].tolist())
        free = [c for c in rng.permutation(NUM_CELLS).tolist() if c not in fixed]
        for j in objects:
            where = cell[j] if cell[j] >= 0 else free.pop()
            cells[i, where] = digit[j]
            colours[i, where] = colour[j] if colour[j] >= 0 else rng.integers(len(COLOURS))
    return cells, colours


def render(rng: np.random.Generator, cells: np.ndarray, colours: np.ndarray, split: str = "train") -> np.ndarray:
    """(N, CANVAS, CANVAS, 3) float32 images in [-1, 1]: a random `split` image of each cell's digit, coloured,
    at a random offset in its cell."""
    images, labels = digits_data.single_digits(split)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    palette = np.asarray(list(COLOURS.values()), np.float32)
    n = len(cells)
    out = np.zeros((n, CANVAS, CANVAS, 3), np.float32)
    for i, k in zip(*np.nonzero(cells >= 0), strict=True):
        d = cells[i, k]
        ink = images[by_class[d][rng.integers(len(by_class[d]))]] / 16.0
        dy, dx = 1 + rng.integers(0, JITTER + 1, size=2)
        y, x = (k // 2) * CELL + dy, (k % 2) * CELL + dx
        out[i, y : y + 8, x : x + 8] = ink[..., None] * palette[colours[i, k]]
    return digits_data.from_unit(out)


def sample_scenes(
    rng: np.random.Generator,
    n: int,
    split: str = "train",
    prompt_ids: np.ndarray | None = None,
    tasks: str | tuple[str, ...] | None = None,
) -> Scenes:
    """`n` scenes for random prompts of `tasks` (`sample_prompts`) or the given ids, from `split`'s digits."""
    ids = sample_prompts(rng, n, tasks) if prompt_ids is None else np.asarray(prompt_ids, np.int64)
    cells, colours = layout(rng, ids)
    return Scenes(render(rng, cells, colours, split), cells, colours, ids)


def cell_crops(images: np.ndarray) -> np.ndarray:
    """(N, CANVAS, CANVAS, 3) -> (N, NUM_CELLS, CELL, CELL, 3), cells row-major."""
    images = np.asarray(images)
    n = len(images)
    return images.reshape(n, 2, CELL, 2, CELL, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, NUM_CELLS, CELL, CELL, 3)


# Caption corruption (LAION-like noisy captions; `corrupt_captions`): which kinds a prompt of each task admits.
CORRUPTIONS = ("attribute", "partial", "digit")  # a wrong colour, a caption naming fewer objects, a swapped digit


@functools.cache
def _prompt_index() -> dict[str, int]:
    return {p: i for i, p in enumerate(all_prompts())}


def _phrase(objects: list[tuple[int, int, int]]) -> str:
    """The prompt naming `objects` ((digit, cell, colour) with -1 = unnamed) as `_objects` words it."""

    def one(d: int, cell: int, colour: int) -> str:
        word = f"a {COLOUR_NAMES[colour]} {d}" if colour >= 0 else f"a {d}"
        return f"{word} {POSITIONS[cell]}" if cell >= 0 else word

    digits = [o[0] for o in objects]
    if len(objects) > 2:  # counting: n copies of one digit
        return f"{COUNT_WORDS[len(objects)]} copies of {digits[0]}"
    return " and ".join(one(*o) for o in objects)


def _corruptions(pid: int) -> dict[str, list[int]]:
    """For prompt `pid`, each kind of `CORRUPTIONS` -> the prompt ids it can turn the caption into (other prompts
    of the world; a kind the prompt does not admit is absent)."""
    s, index = spec(), _prompt_index()
    objects = [(int(d), int(c), int(k)) for d, c, k in zip(s.digit[pid], s.cell[pid], s.colour[pid], strict=True)]
    objects = [o for o in objects if o[0] >= 0]
    out: dict[str, list[int]] = {}

    def add(kind: str, objs: list[tuple[int, int, int]]) -> None:
        i = index.get(_phrase(objs))
        if i is not None and i != pid:
            out.setdefault(kind, []).append(i)

    for j, (d, cell, colour) in enumerate(objects):
        if colour >= 0:
            for other in range(len(COLOURS)):
                if other != colour:
                    add("attribute", objects[:j] + [(d, cell, other)] + objects[j + 1 :])
        for other in DIGITS:
            if other != d:
                if len(objects) > 2:  # counting names one digit for all copies
                    add("digit", [(other, cell, colour)] * len(objects))
                else:
                    add("digit", objects[:j] + [(other, cell, colour)] + objects[j + 1 :])
    if len(objects) == 2:
        for keep in objects:
            add("partial", [keep])
    elif any(o[2] >= 0 or o[1] >= 0 for o in objects):  # a single object's colour left out
        add("partial", [(o[0], -1, -1) for o in objects])
    return out


def corrupt_captions(rng: np.random.Generator, prompt_ids: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """LAION-like captions: each caption is corrupted with probability `rate`, by a kind of `CORRUPTIONS` drawn
    uniformly from those its prompt admits, into a uniformly drawn prompt of that kind. The image stays, so the
    caption no longer describes it. Returns (new prompt ids, kind index into `CORRUPTIONS` or -1 = unchanged)."""
    ids = np.asarray(prompt_ids, np.int64).copy()
    kinds = np.full(len(ids), -1, np.int64)
    hit = rng.random(len(ids)) < rate
    table = {int(p): _corruptions(int(p)) for p in np.unique(ids[hit])}
    for i in np.flatnonzero(hit):
        options = table[int(ids[i])]
        if not options:
            continue
        kind = sorted(options)[rng.integers(len(options))]
        ids[i] = options[kind][rng.integers(len(options[kind]))]
        kinds[i] = CORRUPTIONS.index(kind)
    return ids, kinds
