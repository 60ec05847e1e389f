"""Multimodal data: the scene generator (splits, captions, paraphrases, questions, pixels, resumable batches) checked
against independent re-derivations in this file, and image input (load_image, data: URLs, caption folders) with its
errors. CPU only, ~5 s."""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from deepsail.multimodal.images import decode_data_url, load_folder, load_image, to_tensor
from deepsail.multimodal.scenes import (
    ANSWERS,
    CELLS,
    COLOURS,
    HELD_OUT,
    QUESTION_KINDS,
    RGB,
    SHAPES,
    SIZES,
    Scene,
    SceneBatches,
    SceneObject,
    make_scenes,
    parse_caption,
    sample_scene,
)

NUMBERS = ("one", "two", "three")


def objects_of(scenes: list[Scene]) -> list[SceneObject]:
    return [o for s in scenes for o in s.objects]


# --- vocabulary and splits ---


def test_vocabulary_and_held_out_pairs():
    assert SHAPES == ("circle", "square", "triangle", "cross")
    assert COLOURS == ("red", "green", "blue", "yellow", "purple", "orange")
    assert len(set(RGB.values())) == len(COLOURS) and set(RGB) == set(COLOURS)
    assert len(ANSWERS) == len(set(ANSWERS))
    assert set(COLOURS + SHAPES + SIZES + NUMBERS + CELLS + ("yes", "no")) == set(ANSWERS)
    assert len(HELD_OUT) == 6
    assert sorted(c for c, _ in HELD_OUT) == sorted(COLOURS)  # every colour held out with exactly one shape
    for shape in SHAPES:
        assert 1 <= sum(s == shape for _, s in HELD_OUT) <= 2


def test_splits_keep_held_out_pairs_apart():
    train = objects_of(make_scenes(5000, seed=0, split="train"))
    assert len(train) > 9000
    assert not {(o.colour, o.shape) for o in train} & HELD_OUT
    assert len({(o.colour, o.shape) for o in train}) == 18  # every other pair does occur
    assert not {(o.colour, o.shape) for o in objects_of(make_scenes(1000, seed=0, split="test"))} & HELD_OUT
    heldout = make_scenes(1000, seed=0, split="heldout")
    assert all(any((o.colour, o.shape) in HELD_OUT for o in s.objects) for s in heldout)
    assert {(o.colour, o.shape) for o in objects_of(heldout)} >= HELD_OUT
    # unique captions cap single-object heldout scenes at 6 pairs x 2 sizes x 9 cells = 108
    assert 95 <= sum(len(s.objects) == 1 for s in heldout) <= 108
    rng = np.random.default_rng(0)
    counts = np.bincount([len(sample_scene(rng, "heldout").objects) for _ in range(1200)], minlength=4)
    assert counts[0] == 0 and min(counts[1:]) > 300  # 1..3 objects, uniform
    with pytest.raises(ValueError, match="train, test, heldout"):
        sample_scene(np.random.default_rng(0), "validation")
    with pytest.raises(ValueError, match="unknown split"):
        make_scenes(3, seed=0, split="dev")


def test_make_scenes_is_deterministic_and_captions_unique():
    a = make_scenes(2000, seed=1, split="train")
    assert a == make_scenes(2000, seed=1, split="train")
    assert a[:100] == make_scenes(100, seed=1, split="train")
    assert len({s.caption for s in a}) == 2000
    assert [s.caption for s in make_scenes(50, seed=2, split="train")] != [s.caption for s in a[:50]]
    # test and train streams are different for the same seed; only short captions (324 one-object ones) coincide
    test = make_scenes(2000, seed=1, split="test")
    assert sum(s.caption == t.caption for s, t in zip(a, test, strict=True)) < 10
    shared = {s.caption for s in test} & {s.caption for s in a}
    assert len([c for c in shared if " and " in c]) < 20


def test_caption_form_and_identity():
    red = SceneObject("circle", "red", "small", 0, dx=0.1, scale=1.05)
    blue = SceneObject("square", "blue", "large", 4)
    green = SceneObject("cross", "green", "small", 8)
    assert Scene((red,)).caption == "a small red circle at the top left"
    assert Scene((blue, red)).caption == "a small red circle at the top left and a large blue square in the center"
    assert Scene((green, red, blue)).caption == (
        "a small red circle at the top left, a large blue square in the center and a small green cross at the "
        "bottom right"
    )
    # jitter and background do not change the caption; any attribute does
    assert Scene((SceneObject("circle", "red", "small", 0),), background=228).caption == Scene((red,)).caption
    for change in ({"shape": "cross"}, {"colour": "blue"}, {"size": "large"}, {"cell": 1}):
        other = SceneObject(**{**red.__dict__, **change})
        assert Scene((other,)).caption != Scene((red,)).caption


def test_parse_caption_round_trip():
    for scene in make_scenes(1000, seed=3, split="heldout"):
        expected = [(o.size, o.colour, o.shape, CELLS[o.cell]) for o in scene.objects]
        assert parse_caption(scene.caption) == expected
    assert parse_caption("a large blue cross at the top center") == [("large", "blue", "cross", "top center")]
    for bad in (
        "",
        "a small red circle",
        "a small red circle at the center",
        "a small red circle in the top left",
        "a huge red circle in the center",
        "a small red circle in the center, a large blue square at the top left",
        "a small red circle in the center and",
        "two red circles",
    ):
        assert parse_caption(bad) is None, bad


# --- paraphrases: parsed here by an independent grammar and checked against the scene ---

MENTION = re.compile(
    rf"(an?) (?:({'|'.join(SIZES)}) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
    rf"(?: (?:at the ({'|'.join(CELLS)})|in the (center)))?"
)
RELATION = re.compile(rf"({MENTION.pattern}) (to the left of|to the right of|above|below) ({MENTION.pattern})")


def mention(text: str) -> dict:
    m = MENTION.fullmatch(text)
    assert m is not None, text
    art, size, colour, shape, cell, center = m.groups()
    assert art == ("an" if (size or colour)[0] in "aeiou" else "a"), text
    assert cell != "center", text  # "at the center" is not in the grammar
    return {"size": size, "colour": colour, "shape": shape, "cell": cell or center}


def fits(o: SceneObject, m: dict) -> bool:
    return all(
        [
            o.colour == m["colour"],
            o.shape == m["shape"],
            m["size"] in (None, o.size),
            m["cell"] in (None, CELLS[o.cell]),
        ]
    )


def is_true(a: SceneObject, relation: str, b: SceneObject) -> bool:
    ra, ca, rb, cb = a.cell // 3, a.cell % 3, b.cell // 3, b.cell % 3
    return {"to the left of": ca < cb, "to the right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


def check_paraphrase(scene: Scene, text: str) -> dict:
    body = re.sub(r"^(there is |an image of |a picture of )", "", text)
    head, _, last = body.rpartition(" and ")
    parts = (head.split(", ") if head else []) + [last]
    mentions, relations = [], []
    for part in parts:
        r = RELATION.fullmatch(part)
        if r is None:
            mentions.append(mention(part))
            continue
        relations.append((len(mentions), r.group(8), len(mentions) + 1))
        mentions += [mention(r.group(1)), mention(r.group(9))]
    assert len(mentions) == len(scene.objects), text  # every object is described exactly once
    # true if some one-to-one assignment of mentions to objects satisfies every attribute and relation
    assert any(
        all(fits(o, m) for o, m in zip(perm, mentions, strict=True))
        and all(is_true(perm[i], rel, perm[j]) for i, rel, j in relations)
        for perm in itertools.permutations(scene.objects)
    ), (text, scene.caption)
    return {"opener": body != text, "relations": len(relations), "sizes": sum(m["size"] is not None for m in mentions)}


def test_paraphrases_are_true_and_varied():
    rng = np.random.default_rng(0)
    stats = []
    for scene in make_scenes(400, seed=4, split="heldout"):
        for _ in range(3):
            stats.append(check_paraphrase(scene, scene.paraphrase(rng)))
    assert 0.3 < np.mean([s["opener"] for s in stats]) < 0.95
    assert 0.15 < np.mean([s["relations"] > 0 for s in stats]) < 0.6
    assert 0 < sum(s["sizes"] for s in stats) < sum(1 for _ in stats) * 3
    # the checker itself rejects a false paraphrase
    scene = Scene((SceneObject("circle", "red", "small", 0), SceneObject("square", "blue", "large", 8)))
    check_paraphrase(scene, "a small red circle to the left of a blue square")
    for false in ("a large red circle and a blue square", "a blue square to the left of a red circle"):
        with pytest.raises(AssertionError):
            check_paraphrase(scene, false)


# --- questions: every answer re-derived from the scene ---


def resolve(scene: Scene, ref: str) -> SceneObject:
    words = ref.split()
    attrs = {}
    for w in words:
        key = "size" if w in SIZES else "colour" if w in COLOURS else "shape" if w in SHAPES else None
        assert key is not None or w == "object", ref
        if key:
            attrs[key] = w
    assert ("shape" in attrs) != (words[-1] == "object"), ref
    hits = [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]
    assert len(hits) == 1, f"{ref!r} is ambiguous or empty in {scene.caption!r}"
    return hits[0]


def check_question(scene: Scene, q) -> None:
    assert q.kind in QUESTION_KINDS and q.answer in ANSWERS, q
    if q.kind == "count":
        assert q.text == "how many objects are there?" and q.answer == NUMBERS[len(scene.objects) - 1]
    elif q.kind == "exists":
        m = re.fullmatch(rf"is there an? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\?", q.text)
        present = any((o.colour, o.shape) == m.groups() for o in scene.objects)
        assert q.answer == ("yes" if present else "no"), q
    elif q.kind == "relation":
        m = re.fullmatch(r"is the (.+) (to the left of|to the right of|above|below) the (.+)\?", q.text)
        a, b = resolve(scene, m[1]), resolve(scene, m[3])
        assert a is not b
        assert q.answer == ("yes" if is_true(a, m[2], b) else "no"), q
    elif q.kind == "position":
        ref = re.fullmatch(r"where is the (.+)\?", q.text)[1]
        assert q.answer == CELLS[resolve(scene, ref).cell]
    else:
        ref = re.fullmatch(rf"what {q.kind} is the (.+)\?", q.text)[1]
        vocab = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[q.kind]
        assert not set(ref.split()) & set(vocab), f"{q.text} gives the answer away"
        obj = resolve(scene, ref)
        assert q.answer == getattr(obj, q.kind), q
        if q.kind != "shape" and sum(o.shape == obj.shape for o in scene.objects) == 1:
            assert ref == obj.shape, f"{ref!r} is not the shortest ref"


def test_questions_are_answered_correctly():
    rng = np.random.default_rng(1)
    asked = []
    for split in ("train", "heldout"):
        for scene in make_scenes(300, seed=5, split=split):
            qs = scene.questions(rng, 8)
            assert len(qs) == 8
            for q in qs:
                check_question(scene, q)
                if split == "train" and q.kind == "exists":
                    words = tuple(q.text.rstrip("?").split()[-2:])
                    assert words not in HELD_OUT, q  # train text never names a held-out pair
            asked += qs
    kinds = {k: [q for q in asked if q.kind == k] for k in QUESTION_KINDS}
    assert min(len(v) for v in kinds.values()) > 150  # every kind is asked, roughly uniformly
    for k in ("exists", "relation"):
        assert 0.4 < np.mean([q.answer == "yes" for q in kinds[k]]) < 0.6, k
    one = Scene((SceneObject("circle", "red", "small", 4),))
    assert not [q for q in one.questions(rng, 50) if q.kind == "relation"]  # needs two objects


def test_question_refs_never_ambiguous_for_twins():
    # two small red circles: no ref tells them apart except by position, so only count/exists/relation-free kinds
    twins = Scene((SceneObject("circle", "red", "small", 0), SceneObject("circle", "red", "small", 8)))
    for q in twins.questions(np.random.default_rng(0), 30):
        assert q.kind in ("count", "exists"), q
        check_question(twins, q)


# --- pixels match captions ---


def test_render_matches_scene():
    areas = {"small": [], "large": []}
    for scene in make_scenes(300, seed=6, split="heldout"):
        image = scene.render(64)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        cell = 64 / 3
        for o in scene.objects:
            x, y = int((o.col + 0.5 + o.dx) * cell), int((o.row + 0.5 + o.dy) * cell)
            pixel = image[y, x].astype(int)
            want = np.clip(np.array(RGB[o.colour]) + o.tint, 0, 255)
            assert np.abs(pixel - want).max() <= 3, (scene.caption, pixel, want)
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(RGB[c]) - pixel).sum())
            assert nearest == o.colour
        if len(scene.objects) == 1:
            o = scene.objects[0]
            areas[o.size].append(int((np.abs(image.astype(int) - scene.background).max(-1) > 30).sum()))
        occupied = {o.cell for o in scene.objects}
        for c in set(range(9)) - occupied:  # empty cells hold only background
            r0, c0 = int(c // 3 * cell) + 1, int(c % 3 * cell) + 1
            block = image[r0 : r0 + int(cell) - 2, c0 : c0 + int(cell) - 2]
            assert (block == scene.background).all(), (scene.caption, c)
    assert max(areas["small"]) < min(areas["large"])  # "small" and "large" never overlap in pixels
    assert make_scenes(1, seed=0, split="train")[0].render(224).shape == (224, 224, 3)
    with pytest.raises(ValueError, match="at least 8"):
        make_scenes(1, seed=0, split="train")[0].render(4)


# --- batches ---


def same_batch(a: dict, b: dict) -> bool:
    return (
        np.array_equal(a["images"], b["images"])
        and a["captions"] == b["captions"]
        and a["scenes"] == b["scenes"]
        and a.get("questions") == b.get("questions")
    )


def test_scene_batches_resume_exactly():
    it = SceneBatches(batch_size=6, seed=3, size=32, questions=2)
    batches = [next(it) for _ in range(8)]
    assert it.state_dict() == {"step": 8}
    b = batches[0]
    assert b["images"].shape == (6, 32, 32, 3) and b["images"].dtype == np.uint8
    assert len(b["captions"]) == len(b["canonical"]) == len(b["scenes"]) == 6
    assert b["canonical"] == [s.caption for s in b["scenes"]]
    assert all(len(qs) == 2 for qs in b["questions"])
    resumed = SceneBatches(batch_size=6, seed=3, size=32, questions=2)
    resumed.load_state_dict({"step": 7})
    assert same_batch(next(resumed), batches[7])
    assert not same_batch(batches[6], batches[7])
    assert not same_batch(next(iter(SceneBatches(6, seed=4, size=32, questions=2))), batches[0])
    assert "questions" not in next(SceneBatches(4, size=32))


def test_scene_batches_captions_and_arguments():
    plain = next(SceneBatches(64, size=16, paraphrase=0.0))
    assert plain["captions"] == plain["canonical"]
    mixed = next(SceneBatches(64, size=16))
    changed = sum(c != k for c, k in zip(mixed["captions"], mixed["canonical"], strict=True))
    assert 10 < changed < 50
    for scene, caption in zip(mixed["scenes"], mixed["captions"], strict=True):
        check_paraphrase(scene, caption)  # canonical captions are in the paraphrase grammar too
    held = next(SceneBatches(32, size=16, split="heldout"))
    assert all(any((o.colour, o.shape) in HELD_OUT for o in s.objects) for s in held["scenes"])
    for kwargs, msg in (
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2, "split": "val"}, "unknown split"),
        ({"batch_size": 2, "paraphrase": 1.5}, "probability"),
        ({"batch_size": 2, "questions": -1}, "questions"),
        ({"batch_size": 2, "size": 2}, "at least 8"),
    ):
        with pytest.raises(ValueError, match=msg):
            SceneBatches(**kwargs)


# --- load_image ---


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds no pixels: what a decompression bomb looks like to open()."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_load_image_good_inputs(tmp_path):
    solid = Image.new("RGB", (40, 30), (10, 200, 30))
    for source in (encode(solid), solid, np.asarray(solid), encode(solid, "JPEG")):
        x = load_image(source, 16)
        assert x.shape == (16, 16, 3) and x.dtype == np.uint8
        assert np.abs(x.astype(int) - [10, 200, 30]).max() <= 6  # JPEG is lossy
    (tmp_path / "a.png").write_bytes(encode(solid))
    assert (load_image(tmp_path / "a.png", 8) == [10, 200, 30]).all()
    assert (load_image(str(tmp_path / "a.png"), 8) == [10, 200, 30]).all()

    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 20))  # left half fully transparent
    x = load_image(encode(rgba), 20)
    assert (x[:, :8] == 255).all() and (x[:, 12:] == [0, 0, 255]).all()  # alpha over white
    assert (load_image(encode(Image.new("L", (9, 9), 100)), 4) == 100).all()
    assert (load_image(encode(Image.new("1", (9, 9), 1)), 4) == 255).all()
    assert (load_image(encode(Image.new("LA", (9, 9), (0, 0))), 4) == 255).all()

    palette = Image.new("P", (10, 10), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    assert (load_image(encode(palette), 5) == [200, 10, 10]).all()
    palette.info["transparency"] = 1
    assert (load_image(encode(palette), 5) == 255).all()
    cmyk = load_image(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), 8)  # pure red ink
    assert (cmyk == [255, 0, 0]).all()

    x = load_image(np.zeros((5, 7, 3), np.uint8), 4)
    x[0, 0] = 1  # a fresh writable array, not a view of a PIL buffer

    # a phone photo stored sideways: EXIF orientation 6 turns it 90 degrees clockwise, red left half -> top half
    sideways = Image.new("RGB", (20, 10), (255, 0, 0))
    sideways.paste((0, 0, 255), (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    sideways.save(buf, "JPEG", exif=exif, quality=95)
    x = load_image(buf.getvalue(), 8).astype(int)
    assert x[0, :, 0].min() > 200 and x[-1, :, 2].min() > 200, x[:, :, 0]


def test_load_image_errors(tmp_path):
    cases = [
        (b"not an image at all", r"image bytes is not an image Pillow can decode \("),
        (encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))[:500], "decode"),
        (b"", "image bytes are empty"),
        (np.zeros((0, 5, 3), np.uint8), r"zero width or height \(5 x 0"),
        (Image.new("RGB", (0, 3)), "zero width or height"),
        (np.zeros((4, 4, 4), np.uint8), r"shape \[4, 4, 4\] and dtype uint8; expected \[height, width, 3\]"),
        (np.zeros((4, 4, 3), np.float32), "dtype float32"),
        (np.zeros((4, 4), np.uint8), r"shape \[4, 4\]"),
        (encode(Image.new("I;16", (4, 4))), "image bytes has pixel mode 'I;16'.*8-bit"),
        (Image.new("F", (4, 4)), "the image has pixel mode 'F'"),
        (png_header(8000, 8000), "8000 x 8000 = 64 MP, over the limit of 40 MP"),
        (png_header(20000, 20000), "too large to decode safely"),
        (tmp_path / "missing.png", "missing.png does not exist"),
        (tmp_path, "is a folder"),
        (12, "not int"),
    ]
    for source, msg in cases:
        with pytest.raises(ValueError, match=msg):
            load_image(source, 8)
    (tmp_path / "bad.png").write_bytes(b"GIF89a broken")
    with pytest.raises(ValueError, match=r"bad.png is not an image Pillow can decode"):
        load_image(tmp_path / "bad.png", 8)
    with pytest.raises(ValueError, match="size"):
        load_image(np.zeros((4, 4, 3), np.uint8), 0)
    (tmp_path / "cut.png").write_bytes(cases[1][0])
    with Image.open(tmp_path / "cut.png") as lazy:  # opened by the caller, not yet decoded
        with pytest.raises(ValueError, match=r"the image could not be decoded by Pillow \(image file is truncated"):
            load_image(lazy, 8)


def test_to_tensor():
    x = np.zeros((2, 4, 5, 3), np.uint8)
    x[1, :, :, 2] = 255
    t = to_tensor(x)
    assert t.shape == (2, 3, 4, 5) and t.dtype == torch.float32 and t.is_contiguous()
    assert (t[0] == -1).all() and (t[1, 2] == 1).all() and (t[1, :2] == -1).all()
    assert to_tensor(np.full((4, 5, 3), 128, np.uint8)).shape == (1, 3, 4, 5)
    for bad in (np.zeros((2, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), [[0, 0, 0]]):
        with pytest.raises(ValueError, match="to_tensor expects uint8"):
            to_tensor(bad)


# --- data: URLs ---


def test_decode_data_url():
    data = encode(Image.new("RGB", (3, 3)))
    b64 = base64.b64encode(data).decode()
    assert decode_data_url(f"data:image/png;base64,{b64}") == data
    assert decode_data_url(f"DATA:Image/PNG;BASE64,{b64[:20]}\n{b64[20:]}") == data  # wrapped lines, any case
    assert decode_data_url(f"data:image/png;base64,{b64}", max_bytes=len(data)) == data
    for n in range(1, 7):  # the limit is checked exactly, whatever the padding
        assert len(decode_data_url("data:image/png;base64," + base64.b64encode(b"x" * n).decode(), max_bytes=n)) == n
        with pytest.raises(ValueError, match=f"is {n} bytes, over the limit of {n - 1}"):
            decode_data_url("data:image/png;base64," + base64.b64encode(b"x" * n).decode(), max_bytes=n - 1)
    for url, msg in (
        ("https://example.com/cat.png", "only data: URLs are accepted; the server fetches nothing .got a https: URL"),
        ("file:///etc/passwd", "got a file: URL"),
        ("/etc/passwd", "only data: URLs"),
        (f"data:text/plain;base64,{b64}", "media type 'text/plain'"),
        (f"data:;base64,{b64}", "media type"),
        (f"data:image/png,{data!r}", "not base64-encoded"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png;base64,abc", "not valid base64"),
        ("data:image/png;base64,", "empty payload"),
        ("data:image/png;base64", "no ','"),
        (f"data:image/png;base64,{b64}", f"is {len(data)} bytes, over the limit of 10"),
        (None, "must be a string"),
    ):
        with pytest.raises(ValueError, match=msg):
            decode_data_url(url, max_bytes=10 if "limit" in msg else 10 * 2**20)


# --- caption folders ---


def write_folder(root, lines: list[str], images=("images/a.png", "images/b.png")):
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name in images:
        (root / name).write_bytes(encode(Image.new("RGB", (4, 4))))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_load_folder_good(tmp_path):
    lines = [
        json.dumps({"image": "images/a.png", "caption": "a red circle"}),
        "",
        json.dumps({"image": "images/b.png", "caption": "a blue square", "source": "mine"}),
        json.dumps({"image": "images/a.png", "caption": "a circle, red"}),
    ]
    pairs = load_folder(write_folder(tmp_path, lines))
    assert pairs == [
        (tmp_path / "images/a.png", "a red circle"),
        (tmp_path / "images/b.png", "a blue square"),
        (tmp_path / "images/a.png", "a circle, red"),
    ]
    assert load_image(pairs[0][0], 4).shape == (4, 4, 3)


@pytest.mark.parametrize(
    "line, msg",
    [
        ('{"image": "images/a.png", "caption": "x"', r"captions.jsonl:2: not valid JSON"),
        ('["images/a.png", "x"]', r"captions.jsonl:2: expected an object"),
        ('{"caption": "x"}', r'captions.jsonl:2: the "image" key is missing'),
        ('{"image": "images/a.png"}', r'captions.jsonl:2: the "caption" key is missing'),
        ('{"image": "images/a.png", "caption": "  "}', r'captions.jsonl:2: "caption" is empty'),
        ('{"image": "images/a.png", "caption": 123}', r'captions.jsonl:2: "caption" must be a string, got int 123'),
        (
            '{"image": "../secret.png", "caption": "x"}',
            r"captions.jsonl:2: image path '../secret.png' must be relative",
        ),
        ('{"image": "/etc/hosts", "caption": "x"}', r"captions.jsonl:2: image path '/etc/hosts' must be relative"),
        ('{"image": "images/c.png", "caption": "x"}', r"captions.jsonl:2: image .*images/c.png does not exist"),
    ],
)
def test_load_folder_errors(tmp_path, line, msg):
    good = json.dumps({"image": "images/a.png", "caption": "fine"})
    with pytest.raises(ValueError, match=msg):
        load_folder(write_folder(tmp_path, [good, line]))


def test_load_folder_missing_and_empty(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        load_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"captions.jsonl does not exist"):
        load_folder(tmp_path)
    write_folder(tmp_path, ["", "  "])
    with pytest.raises(ValueError, match="holds no records"):
        load_folder(tmp_path)
    (tmp_path / "captions.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_folder(tmp_path)
