"""Procedural scenes: coloured shapes on a 3x3 grid, with the captions and questions that are true of them.

    scene = sample_scene(np.random.default_rng(0), "train")
    scene.caption                   # "a small red circle at the top left and a large blue square in the center"
    scene.render(64)                # uint8 [64, 64, 3]
    scene.questions(rng, 4)         # [Question("what colour is the circle?", "red", "colour"), ...]
    for batch in SceneBatches(batch_size=64, seed=0, questions=2): ...   # endless, resumable

Why synthetic: every caption and answer is true by construction, so a model's mistakes are the model's, it costs no
download, and a grid of 4 shapes x 6 colours x 2 sizes x 9 cells is small enough to learn on one CPU yet large enough
that memorising captions does not work (3.9 M distinct three-object scenes). Compositional generalisation is tested
directly: the 6 colour/shape pairs in HELD_OUT never occur in the "train" split (nor in any of its captions or
questions) and every "heldout" scene holds at least one of them, so a model that learned "red" and "triangle"
separately should still caption a red triangle.

Splits: "train" and "test" are the same distribution (no held-out pair) drawn from different random streams;
"heldout" scenes hold at least one held-out pair. Test scenes are not filtered against the train stream: with 1..3
objects there are only 324 single-object train scenes, so short test captions will also occur in training, as they
would in any natural data set; long ones almost never do.

Geometry: an object stays inside its cell (its jitter is limited so that its outline never crosses the cell's border),
so objects never touch and the cell a caption names is the cell the pixels are in. Everything random comes from numpy
Generators derived from (seed, split[, batch]) so every stream is reproducible and resumable.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
CELLS = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)  # index = row * 3 + col
COUNTS = ("one", "two", "three")
MAX_OBJECTS = len(COUNTS)

# Pure-ish hues, far apart from each other and from the light grey background: the closest pair, yellow and orange,
# differ by 65 in green, so a colour jitter of +-12 per channel on both still leaves them 41 apart.
RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 20),
}

# Every colour is held out with exactly one shape and every shape with 1-2 colours, so each word is seen in training
# with most of its partners: 18 of the 24 pairs are trained on.
HELD_OUT = frozenset(
    {
        ("red", "triangle"),
        ("green", "circle"),
        ("blue", "cross"),
        ("yellow", "square"),
        ("purple", "triangle"),
        ("orange", "circle"),
    }
)
TRAIN_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT)
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
HELD_OUT_PAIRS = tuple(p for p in ALL_PAIRS if p in HELD_OUT)  # a fixed order, so sampling is deterministic

SPLITS = ("train", "test", "heldout")
SPLIT_INDEX = {name: i for i, name in enumerate(SPLITS)}

QUESTION_KINDS = ("colour", "shape", "size", "count", "position", "relation", "exists")
ANSWERS = tuple(dict.fromkeys(COLOURS + SHAPES + SIZES + COUNTS + CELLS + ("yes", "no")))

# Relations between two objects, by cell: left-of is a strictly smaller column, above a strictly smaller row.
RELATIONS = ("to the left of", "to the right of", "above", "below")

# Sizes as a fraction of a cell: the radius of the circle the shape is drawn around. Small and large differ ~3x in
# area, and with the +-10% scale jitter the largest small (0.242) stays well below the smallest large (0.342).
RADIUS = {"small": 0.22, "large": 0.38}
SCALE_JITTER = 0.10
SHIFT = 0.15  # the most an object's centre moves from its cell's centre, in cells (less for large objects, below)
COLOUR_JITTER = 12
ROTATION = 10.0  # degrees, for the shapes that have corners
# How far each shape reaches beyond its radius (a square's corner sits at 0.82 * sqrt(2) = 1.16 radii, rotation
# included); a large object's shift is cut so that radius * reach + shift <= 0.5 cell and it never leaves its cell.
REACH = {"circle": 1.0, "square": 1.16, "triangle": 1.1, "cross": 1.06}


@dataclass(frozen=True)
class SceneObject:
    """One shape in one cell. dx, dy: centre offset in cells; scale: radius multiplier; tint: per-channel colour
    offset; angle: rotation in degrees (ignored for circles)."""

    shape: str
    colour: str
    size: str
    cell: int
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    tint: tuple[int, int, int] = (0, 0, 0)
    angle: float = 0.0

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    @property
    def where(self) -> str:
        return "in the center" if CELLS[self.cell] == "center" else f"at the {CELLS[self.cell]}"

    @property
    def phrase(self) -> str:
        """The canonical description: 'a small red circle at the top left'."""
        return f"a {self.size} {self.colour} {self.shape} {self.where}"


@dataclass(frozen=True)
class Question:
    """A question about a scene, its one-word or cell-phrase answer (one of ANSWERS) and its kind (QUESTION_KINDS)."""

    text: str
    answer: str
    kind: str


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def join(parts: list[str]) -> str:
    """'X', 'X and Y', 'X, Y and Z'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def holds(a: SceneObject, relation: str, b: SceneObject) -> bool:
    """Whether `a <relation> b` is true given their cells."""
    if relation == "to the left of":
        return a.col < b.col
    if relation == "to the right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    assert relation == "below", relation
    return a.row > b.row


# Referring expressions, shortest first (ties in this order); each names a subset of {shape, colour, size}.
# "{size} {shape}" and "{size} {colour} object" go beyond the obvious four: without them a colour question about one
# of two same-shaped objects ("what colour is the large circle?"), or a shape question about one of two same-coloured
# ones ("what shape is the small red object?"), could never be asked.
REF_FORMS = (
    ("shape",),
    ("colour",),
    ("colour", "shape"),
    ("size", "shape"),
    ("size", "colour"),
    ("size", "colour", "shape"),
)


def ref_text(obj: SceneObject, form: tuple[str, ...]) -> str:
    words = [getattr(obj, a) for a in ("size", "colour", "shape") if a in form]
    return " ".join(words) if "shape" in form else " ".join(words) + " object"


def matches(obj: SceneObject, other: SceneObject, form: tuple[str, ...]) -> bool:
    return all(getattr(obj, a) == getattr(other, a) for a in form)


@dataclass(frozen=True)
class Scene:
    """1..3 objects in distinct cells, in reading order (by cell), on a light grey background."""

    objects: tuple[SceneObject, ...]
    background: int = 235

    @property
    def caption(self) -> str:
        """The canonical caption: every object in reading order, all four attributes, so two scenes share a caption
        exactly when they share every object's shape, colour, size and cell."""
        return join([o.phrase for o in sorted(self.objects, key=lambda o: o.cell)])

    def ref(self, obj: SceneObject, avoid: str | None = None) -> str | None:
        """The shortest description that picks out `obj` alone in this scene, never using attribute `avoid` (the
        one a question asks about); None if there is none."""
        for form in REF_FORMS:
            if avoid in form:
                continue
            if sum(matches(obj, o, form) for o in self.objects) == 1:
                return ref_text(obj, form)
        return None

    def paraphrase(self, rng: np.random.Generator) -> str:
        """A random true description for augmentation: objects in any order, size and position each included half
        the time, an optional opener, and with 2+ objects half the time a relation between two of them."""
        order = [self.objects[i] for i in rng.permutation(len(self.objects))]

        def describe(o: SceneObject) -> str:
            words = ([o.size] if rng.random() < 0.5 else []) + [o.colour, o.shape]
            text = f"{article(words[0])} {' '.join(words)}"
            return text + f" {o.where}" if rng.random() < 0.5 else text

        parts = []
        if len(order) >= 2 and rng.random() < 0.5:
            a, b = order[0], order[1]
            true = [r for r in RELATIONS if holds(a, r, b)]  # never empty: distinct cells differ in row or column
            relation = true[rng.integers(len(true))]
            parts.append(f"{describe(a)} {relation} {describe(b)}")
            order = order[2:]
        parts += [describe(o) for o in order]
        opener = ("", "there is ", "an image of ", "a picture of ")[rng.integers(4)]
        return opener + join(parts)

    def questions(self, rng: np.random.Generator, n: int) -> list[Question]:
        """n independent questions with their answers, kinds drawn uniformly (a kind that cannot be asked about the
        drawn object, say a colour question about one of two same-shape same-size objects, is drawn again). They may
        repeat: refusing repeats would skew the mix, since a scene has one count question but ~17 absent pairs to ask
        "is there ...?" about (measured: "yes" fell from 50% to 36% of exists answers with repeats refused)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        out: list[Question] = []
        while len(out) < n:
            q = self.question(rng)
            if q is not None:
                out.append(q)
        return out

    def question(self, rng: np.random.Generator) -> Question | None:
        """One question of a uniformly drawn kind, or None when that kind cannot be asked about the drawn object."""
        kind = QUESTION_KINDS[rng.integers(len(QUESTION_KINDS))]
        obj = self.objects[rng.integers(len(self.objects))]
        if kind == "count":
            return Question("how many objects are there?", COUNTS[len(self.objects) - 1], kind)
        if kind == "exists":
            if rng.random() < 0.5:
                return Question(f"is there {article(obj.colour)} {obj.colour} {obj.shape}?", "yes", kind)
            # Absent pairs come only from the training pairs, so no train question ever names a held-out pair (a
            # model must not learn "red triangle -> no"); held-out pairs are asked about only where present.
            present = {(o.colour, o.shape) for o in self.objects}
            absent = [p for p in TRAIN_PAIRS if p not in present]
            colour, shape = absent[rng.integers(len(absent))]
            return Question(f"is there {article(colour)} {colour} {shape}?", "no", kind)
        if kind == "relation":
            if len(self.objects) < 2:
                return None
            other = [o for o in self.objects if o is not obj][rng.integers(len(self.objects) - 1)]
            a, b = self.ref(obj), self.ref(other)
            if a is None or b is None:
                return None
            # Half the questions use a true relation, half a false one, so "yes" and "no" are equally likely.
            want = bool(rng.random() < 0.5)
            pool = [r for r in RELATIONS if holds(obj, r, other) == want]
            relation = pool[rng.integers(len(pool))]
            return Question(f"is the {a} {relation} the {b}?", "yes" if want else "no", kind)
        if kind == "position":
            r = self.ref(obj)
            return None if r is None else Question(f"where is the {r}?", CELLS[obj.cell], kind)
        r = self.ref(obj, avoid=kind)  # colour, shape, size: the ref must not give the answer away
        return None if r is None else Question(f"what {kind} is the {r}?", getattr(obj, kind), kind)

    def render(self, size: int = 64) -> np.ndarray:
        """uint8 [size, size, 3], a fresh writable array. Drawn at twice the size and 2x2-box-downsampled, which
        anti-aliases the edges (jagged 1x edges are a cue a ViT with 4-8 px patches could latch onto) and still runs
        at 15,800-16,900 images/s at 64 px, 9,900/s at 128 and 4,400/s at 224 on one core (OMP_NUM_THREADS=1, shared
        2-core box), far above what a model trained on them consumes."""
        if size < 8:
            raise ValueError(f"render size must be at least 8 pixels, got {size}")
        big = 2 * size
        cell = big / 3
        image = Image.new("RGB", (big, big), (self.background,) * 3)
        draw = ImageDraw.Draw(image)
        for o in self.objects:
            cx, cy = (o.col + 0.5 + o.dx) * cell, (o.row + 0.5 + o.dy) * cell
            r = RADIUS[o.size] * o.scale * cell
            fill = tuple(int(np.clip(v + t, 0, 255)) for v, t in zip(RGB[o.colour], o.tint, strict=True))
            if o.shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            else:
                draw.polygon(outline(o.shape, cx, cy, r, o.angle), fill=fill)
        return np.array(image.reduce(2))


def outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """The polygon of a square, triangle (pointing up) or plus-shaped cross around (cx, cy), rotated by `angle`."""
    if shape == "square":
        h = 0.82 * r
        points = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        # Equilateral, centroid on the centre; 1.1 r to its corners gives it about the area of a square of 0.82 r.
        k = 1.1 * r
        points = [(k * math.cos(a), k * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:
        assert shape == "cross", shape
        w = 0.35 * r
        points = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w)]
        points += [(-w, -w)]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def check_split(split: str) -> None:
    if split not in SPLIT_INDEX:
        raise ValueError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")


def sample_object(rng: np.random.Generator, pair: tuple[str, str], cell: int) -> SceneObject:
    colour, shape = pair
    size = SIZES[rng.integers(len(SIZES))]
    scale = 1.0 + SCALE_JITTER * rng.uniform(-1, 1)
    shift = min(SHIFT, 0.5 - RADIUS[size] * scale * REACH[shape])
    dx, dy = shift * rng.uniform(-1, 1, size=2)
    tint = tuple(int(t) for t in rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3))
    angle = 0.0 if shape == "circle" else ROTATION * rng.uniform(-1, 1)
    return SceneObject(shape, colour, size, int(cell), float(dx), float(dy), float(scale), tint, float(angle))


def sample_scene(rng: np.random.Generator, split: str) -> Scene:
    """One scene of 1..3 objects (uniform) in distinct cells. "train" and "test": colour/shape pairs uniform over
    the 18 training pairs; "heldout": one object (at a random place in reading order) has a uniform held-out pair,
    the others any of the 24 pairs."""
    check_split(split)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    pairs = [ALL_PAIRS if split == "heldout" else TRAIN_PAIRS] * n
    if split == "heldout":
        pairs[rng.integers(n)] = HELD_OUT_PAIRS
    objects = tuple(sample_object(rng, p[rng.integers(len(p))], c) for p, c in zip(pairs, cells, strict=True))
    return Scene(objects, background=int(rng.integers(225, 246)))


def make_scenes(n: int, seed: int, split: str) -> list[Scene]:
    """n scenes with distinct canonical captions; a duplicate is drawn again. Only 324 single-object captions exist
    for train/test (18 pairs x 2 sizes x 9 cells) and 108 for heldout (6 held-out pairs), so a large set holds fewer
    single-object scenes than a third: 1,000 heldout scenes hold all 108 instead of ~333. The same (n, seed, split)
    always gives the same list, and a shorter list is a prefix of a longer one."""
    check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng([seed, SPLIT_INDEX[split]])
    scenes, seen = [], set()
    while len(scenes) < n:
        scene = sample_scene(rng, split)
        if scene.caption not in seen:
            seen.add(scene.caption)
            scenes.append(scene)
    return scenes


class SceneBatches:
    """Endless training batches. Batch k comes from its own Generator seeded with (seed, split, k), so a run resumed
    from state_dict() sees exactly the batches it would have seen without the interruption.

    Each batch is a dict: "images" uint8 [B, size, size, 3], "captions" (a paraphrase with probability `paraphrase`,
    else the canonical caption), "canonical", "scenes", and with questions > 0 "questions" (that many per scene).
    A batch of 256 at 64 px with 2 questions per scene takes ~31 ms on one core, rendering about half of it."""

    def __init__(
        self,
        batch_size: int,
        seed: int = 0,
        size: int = 64,
        split: str = "train",
        questions: int = 0,
        paraphrase: float = 0.5,
    ) -> None:
        check_split(split)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if size < 8:
            raise ValueError(f"image size must be at least 8 pixels, got {size}")
        if questions < 0:
            raise ValueError(f"questions must be >= 0 (questions per scene), got {questions}")
        if not 0.0 <= paraphrase <= 1.0:
            raise ValueError(f"paraphrase is a probability in [0, 1], got {paraphrase}")
        self.batch_size, self.seed, self.size, self.split = batch_size, seed, size, split
        self.n_questions, self.paraphrase = questions, paraphrase
        self.step = 0

    def __iter__(self) -> SceneBatches:
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, SPLIT_INDEX[self.split], self.step])
        self.step += 1
        scenes = [sample_scene(rng, self.split) for _ in range(self.batch_size)]
        canonical = [s.caption for s in scenes]
        captions = [s.paraphrase(rng) if rng.random() < self.paraphrase else c for s, c in zip(scenes, canonical)]
        batch = {
            "images": np.stack([s.render(self.size) for s in scenes]),
            "captions": captions,
            "canonical": canonical,
            "scenes": scenes,
        }
        if self.n_questions:
            batch["questions"] = [s.questions(rng, self.n_questions) for s in scenes]
        return batch

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


_OBJECT = re.compile(
    rf"an? ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
    rf"(?:at the ({'|'.join(c for c in CELLS if c != 'center')})|in the (center))"
)


def parse_caption(text: str) -> list[tuple[str, str, str, str]] | None:
    """(size, colour, shape, cell phrase) per object of a caption in the canonical grammar ('X', 'X and Y',
    'X, Y and Z', ...), in the caption's order; None if the text is not in that grammar. Order and object count are
    not checked, so a generated caption can be scored attribute by attribute against its scene."""
    head, _, last = text.strip().rpartition(" and ")
    parts = (head.split(", ") if head else []) + [last]
    out = []
    for part in parts:
        m = _OBJECT.fullmatch(part)
        if m is None:
            return None
        size, colour, shape, cell, center = m.groups()
        out.append((size, colour, shape, cell or center))
    return out
