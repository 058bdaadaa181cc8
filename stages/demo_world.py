"""The demo world: seeded captioned scenes of simple coloured shapes.

No pretrained CLIP and no captioned image set can be downloaded on an offline machine, so the
demo generates its own world. A scene holds 1-3 objects, each with a shape, a colour, a size
and a position region, drawn on a textured background with Gaussian pixel noise. Captions
describe the scene through several templates, synonyms and openings, sometimes with a spatial
relation between two objects, and sometimes leaving an attribute out, as real captions do.
A larger model trained on more of this world knows more than a small one, which is what the
demo needs to show distillation.

Every sample is a pure function of ``(seed, split, index)``: its random generator is seeded
from those three numbers, so the output does not depend on the number of worker processes,
and the same seed gives the same bytes.

Each caption comes with the record of what it mentions (:class:`Mention`, :class:`Relation`),
so tests and analyses can check a caption against the scene that was drawn.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

# --- vocabulary --------------------------------------------------------------------------------
# Canonical names first; each maps to the words a caption may use for it.

SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "block"),
    "triangle": ("triangle", "wedge"),
    "diamond": ("diamond", "rhombus"),
    "star": ("star", "five-pointed star"),
    "cross": ("cross", "plus sign"),
}
# Nouns a caption may use instead of the shape's name (the shape is then not mentioned).
GENERIC_NOUNS: tuple[str, ...] = ("shape", "object", "thing")

COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "red": ((215, 35, 35), ("red", "crimson", "scarlet")),
    "orange": ((245, 135, 25), ("orange",)),
    "yellow": ((240, 215, 30), ("yellow", "golden")),
    "green": ((45, 165, 55), ("green", "emerald")),
    "cyan": ((35, 200, 205), ("cyan", "turquoise")),
    "blue": ((45, 75, 225), ("blue", "azure")),
    "purple": ((135, 50, 185), ("purple", "violet")),
    "pink": ((245, 125, 190), ("pink", "rose")),
}

# Radius as a fraction of the image side.
SIZES: dict[str, tuple[float, tuple[str, ...]]] = {
    "small": (0.11, ("small", "little", "tiny")),
    "large": (0.18, ("large", "big")),
}

# Region centre (fraction of the side) and grid cell (column, row) for relations.
POSITIONS: dict[str, tuple[tuple[float, float], tuple[int, int], tuple[str, ...]]] = {
    "top left": ((0.25, 0.25), (0, 0), ("in the top left", "at the upper left", "in the top left corner")),
    "top right": ((0.75, 0.25), (2, 0), ("in the top right", "at the upper right", "in the top right corner")),
    "center": ((0.5, 0.5), (1, 1), ("in the center", "in the middle")),
    "bottom left": ((0.25, 0.75), (0, 2), ("in the bottom left", "at the lower left", "in the bottom left corner")),
    "bottom right": ((0.75, 0.75), (2, 2), ("in the bottom right", "at the lower right", "in the bottom right corner")),
}

RELATIONS: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}

BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain",),
    "gradient": ("shaded", "gradient"),
    "stripes": ("striped",),
    "checker": ("checkered",),
    "mottled": ("mottled", "blotchy"),
}
TONES: dict[str, tuple[str, ...]] = {"dark": ("dark",), "grey": ("grey", "gray"), "light": ("light", "pale")}

OPENINGS: tuple[str, ...] = (
    "a photo of",
    "an image showing",
    "a picture of",
    "there is",
    "this image contains",
    "a rendering of",
    "we see",
    "",
)
COUNT_WORDS = {2: "two", 3: "three"}
COUNT_NOUNS = ("objects", "shapes", "things")

# Zero-shot classification: which scene attribute each task classifies, and its templates.
# Templates use determiners that need no a/an agreement ("the", "one") where the class name
# may start with a vowel; captions use the same determiners, so the prompts are in the
# world's language.
ZEROSHOT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": (
        "a photo of a {}.",
        "an image showing a {}.",
        "there is a {}.",
        "a picture of the {}.",
        "a rendering of one {}.",
    ),
    "colour": (
        "a photo of the {} shape.",
        "an image showing one {} object.",
        "there is the {} thing.",
        "a picture of one {} shape.",
        "a rendering of the {} object.",
    ),
    "size": (
        "a photo of the {} shape.",
        "an image showing one {} object.",
        "there is the {} thing.",
        "a picture of one {} shape.",
    ),
    "position": (
        "a photo of a shape in the {}.",
        "an image showing one object in the {}.",
        "there is a thing in the {}.",
        "a picture of the shape in the {}.",
    ),
}
ZEROSHOT_VOCAB: dict[str, Sequence[str]] = {
    "shape": tuple(SHAPES),
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}

# Fixed stream ids: a sample's generator is seeded from (seed, stream id, index).
SPLIT_STREAMS = {"pretrain": 1, "train": 2, "test": 3}
ZEROSHOT_STREAMS = {"shape": 11, "colour": 12, "size": 13, "position": 14}

SUPERSAMPLE = 4  # objects are drawn at 4x and box-filtered down: anti-aliased edges


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    """Everything that decides the generated bytes, except where they are written."""

    seed: int = 0
    image_size: int = 32
    min_objects: int = 1
    max_objects: int = 3
    relations: bool = True
    relation_prob: float = 0.5  # of captions of a multi-object scene, when relations are on
    noise: float = 8.0  # max std of Gaussian pixel noise, 0-255 units; per image U(0, noise)
    position_jitter: float = 0.03  # fraction of the side
    size_jitter: float = 0.12  # relative
    omit_prob: float = 0.12  # per object: drop the size / position / colour from a caption
    generic_prob: float = 0.08  # per object: "shape"/"object" instead of the shape's name
    background_mention_prob: float = 0.2
    # Split sizes (images); the test split has several captions per image.
    pretrain: int = 30000
    train: int = 6000
    test: int = 1000
    test_captions: int = 5
    zeroshot_tasks: tuple[str, ...] = ("shape", "colour")
    zeroshot_per_class: int = 50
    # Formats: "webdataset" (tar shards, img2dataset layout) or "csv" (open_clip CSV + PNGs).
    pretrain_format: str = "webdataset"
    train_format: str = "webdataset"
    test_format: str = "csv"
    shard_size: int = 1000

    def validate(self) -> None:
        """Raise ``ValueError`` with one line for any inconsistent setting."""
        if self.image_size < 16:
            raise ValueError(f"image size must be >= 16 px, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            raise ValueError(
                f"objects per scene must satisfy 1 <= min <= max <= 3, got {self.min_objects}-{self.max_objects}"
            )
        for name in ("pretrain", "train", "test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} size must be >= 0")
            fmt = getattr(self, f"{name}_format")
            if fmt not in ("webdataset", "csv"):
                raise ValueError(f"{name} format must be 'webdataset' or 'csv', got {fmt!r}")
        if self.test_captions < 1:
            raise ValueError("test captions per image must be >= 1")
        if self.noise < 0:
            raise ValueError("noise must be >= 0")
        if not 1 <= self.shard_size <= 10000:
            raise ValueError("shard size must be in 1..10000 (keys are shard number + 4-digit index)")
        unknown = [t for t in self.zeroshot_tasks if t not in ZEROSHOT_VOCAB]
        if unknown:
            raise ValueError(f"unknown zero-shot task(s) {unknown}; choose from {sorted(ZEROSHOT_VOCAB)}")
        if self.zeroshot_per_class < 0:
            raise ValueError("zero-shot images per class must be >= 0")
        for name in ("relation_prob", "omit_prob", "generic_prob", "background_mention_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")


PROFILES: dict[str, WorldConfig] = {
    # Sized for `dvc repro` of the demo on a 2-core CPU in <= 20 minutes.
    "demo": WorldConfig(),
    # A few hundred images: the same chain end to end in CI.
    "quick": WorldConfig(
        pretrain=400, train=200, test=60, test_captions=5, zeroshot_per_class=6, shard_size=100
    ),
}


# --- scenes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    cx: float  # centre, fraction of the side (after jitter)
    cy: float
    radius: float  # fraction of the side (after jitter)
    angle: float  # degrees
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Background:
    kind: str
    tone: str
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: Background
    noise_std: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Mention:
    """What a caption says about one object; ``None`` where it says nothing."""

    object: int
    shape: str | None
    colour: str | None
    size: str | None
    position: str | None


@dataclass(frozen=True)
class Relation:
    subject: int
    relation: str
    object: int


@dataclass(frozen=True)
class Caption:
    text: str
    mentions: tuple[Mention, ...]
    relation: Relation | None = None
    background: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Sample:
    key: str
    png: bytes
    scene: Scene
    captions: tuple[Caption, ...] = field(default=())


def sample_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of one sample: independent of worker count and of other samples."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def _choice(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, cfg: WorldConfig, fixed: dict[str, str] | None = None) -> Scene:
    """Draw a scene; ``fixed`` pins one attribute of a single-object scene (zero-shot tasks)."""
    if fixed:
        n = 1
    else:
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    regions = [tuple(POSITIONS)[i] for i in rng.permutation(len(POSITIONS))[:n]]
    objects = []
    for position in regions:
        attrs = {
            "shape": _choice(rng, tuple(SHAPES)),
            "colour": _choice(rng, tuple(COLOURS)),
            "size": _choice(rng, tuple(SIZES)),
            "position": position,
        }
        attrs.update(fixed or {})
        (px, py), _, _ = POSITIONS[attrs["position"]]
        jitter = rng.uniform(-cfg.position_jitter, cfg.position_jitter, size=2)
        radius = SIZES[attrs["size"]][0] * (1.0 + rng.uniform(-cfg.size_jitter, cfg.size_jitter))
        base = np.array(COLOURS[attrs["colour"]][0], dtype=np.int64)
        rgb = np.clip(base + rng.integers(-15, 16, size=3), 0, 255)
        objects.append(
            SceneObject(
                cx=round(float(px + jitter[0]), 5),
                cy=round(float(py + jitter[1]), 5),
                radius=round(float(radius), 5),
                angle=round(float(rng.uniform(-12.0, 12.0)), 3),
                rgb=tuple(int(v) for v in rgb),
                **attrs,
            )
        )
    level = int(rng.integers(45, 206))
    tone = "dark" if level < 100 else "light" if level > 150 else "grey"
    tint = rng.integers(-14, 15, size=3)
    background = Background(
        kind=_choice(rng, tuple(BACKGROUNDS)),
        tone=tone,
        rgb=tuple(int(v) for v in np.clip(level + tint, 0, 255)),
    )
    noise_std = round(float(rng.uniform(0.0, cfg.noise)), 4)
    return Scene(objects=tuple(objects), background=background, noise_std=noise_std)


# --- rendering ---------------------------------------------------------------------------------


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius ``r`` (pixels), rotated by ``angle``."""
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.75, y * 0.75) for x, y in pts]  # corner at 1.06 r: same visual size
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
        pts = [(x, y + 0.15) for x, y in pts]  # centre the visual mass
    elif shape == "diamond":
        pts = [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]  # taller than wide: never a rotated square
    elif shape == "star":
        pts = []
        for k in range(10):
            a = math.radians(-90 + 36 * k)
            rr = 1.0 if k % 2 == 0 else 0.45
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    elif shape == "cross":
        w = 0.32
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    t = math.radians(angle)
    c, s = math.cos(t), math.sin(t)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _background(rng: np.random.Generator, bg: Background, size: int) -> np.ndarray:
    """The background as float32 [size, size, 3], texture vectorised over pixels."""
    base = np.asarray(bg.rgb, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    if bg.kind == "plain":
        texture = np.zeros((size, size), np.float32)
    elif bg.kind == "gradient":
        texture = (along / size - 0.5) * rng.uniform(30, 60)
    elif bg.kind == "stripes":
        period = rng.uniform(3.0, 7.0) * size / 32
        texture = np.sin(2 * np.pi * along / period) * rng.uniform(8, 16)
    elif bg.kind == "checker":
        cell = max(2, int(round(rng.uniform(3, 6) * size / 32)))
        texture = (((xx // cell + yy // cell) % 2) * 2 - 1) * rng.uniform(6, 12)
    elif bg.kind == "mottled":
        coarse = rng.normal(0.0, 1.0, size=(5, 5)).astype(np.float32)
        up = Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR)
        texture = np.asarray(up, dtype=np.float32) * rng.uniform(10, 18)
    else:
        raise ValueError(f"unknown background kind {bg.kind}")
    return base[None, None, :] + texture[:, :, None]


def render(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """The scene as uint8 [size, size, 3]: background, anti-aliased objects, pixel noise."""
    big = size * SUPERSAMPLE
    # Objects are drawn premultiplied (colour on black) with a coverage mask, both box-filtered
    # down, then composited: edges blend with the background instead of darkening.
    colour_layer = Image.new("RGB", (big, big), (0, 0, 0))
    mask = Image.new("L", (big, big), 0)
    draw_colour, draw_mask = ImageDraw.Draw(colour_layer), ImageDraw.Draw(mask)
    for obj in scene.objects:
        cx, cy, r = obj.cx * big, obj.cy * big, obj.radius * big
        if obj.shape == "circle":
            box = [cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9]
            draw_colour.ellipse(box, fill=obj.rgb)
            draw_mask.ellipse(box, fill=255)
        else:
            pts = _shape_polygon(obj.shape, cx, cy, r, obj.angle)
            draw_colour.polygon(pts, fill=obj.rgb)
            draw_mask.polygon(pts, fill=255)
    premultiplied = np.asarray(colour_layer.resize((size, size), Image.BOX), dtype=np.float32)
    alpha = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32)[:, :, None] / 255.0
    image = _background(rng, scene.background, size) * (1.0 - alpha) + premultiplied
    if scene.noise_std > 0:
        image = image + rng.normal(0.0, scene.noise_std, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes with no metadata: the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


# --- captions ----------------------------------------------------------------------------------


def _with_article(words: str, determiner: str) -> str:
    if determiner == "a" and words[0] in "aeiou":
        determiner = "an"
    return f"{determiner} {words}"


def _noun_phrase(rng: np.random.Generator, obj: SceneObject, index: int, cfg: WorldConfig, with_position: bool) -> tuple[str, Mention]:
    """A determiner, optional size and colour, the shape (or a generic noun), optional place."""
    generic = rng.random() < cfg.generic_prob
    omit_colour = not generic and rng.random() < cfg.omit_prob  # keep at least one of the two
    omit_size = rng.random() < cfg.omit_prob
    omit_position = rng.random() < cfg.omit_prob
    words = []
    if not omit_size:
        words.append(_choice(rng, SIZES[obj.size][1]))
    if not omit_colour:
        words.append(_choice(rng, COLOURS[obj.colour][1]))
    words.append(_choice(rng, GENERIC_NOUNS) if generic else _choice(rng, SHAPES[obj.shape]))
    determiner = _choice(rng, ("a", "a", "a", "a", "the", "one"))
    phrase = _with_article(" ".join(words), determiner)
    show_position = with_position and not omit_position
    if show_position:
        phrase += " " + _choice(rng, POSITIONS[obj.position][2])
    mention = Mention(
        object=index,
        shape=None if generic else obj.shape,
        colour=None if omit_colour else obj.colour,
        size=None if omit_size else obj.size,
        position=obj.position if show_position else None,
    )
    return phrase, mention


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def valid_relations(a: SceneObject, b: SceneObject) -> list[str]:
    """Relations that hold from object ``a`` to object ``b`` by their position regions."""
    (ca, ra), (cb, rb) = POSITIONS[a.position][1], POSITIONS[b.position][1]
    out = []
    if ca < cb:
        out.append("left of")
    if ca > cb:
        out.append("right of")
    if ra < rb:
        out.append("above")
    if ra > rb:
        out.append("below")
    return out


def describe(scene: Scene, rng: np.random.Generator, cfg: WorldConfig) -> Caption:
    """One caption of the scene, with the record of what it mentions."""
    n = len(scene.objects)
    order = [int(i) for i in rng.permutation(n)]
    relation = None
    if cfg.relations and n >= 2 and rng.random() < cfg.relation_prob:
        subject, target = order[0], order[1]
        rel = _choice(rng, valid_relations(scene.objects[subject], scene.objects[target]))
        relation = Relation(subject=subject, relation=rel, object=target)
        first, m1 = _noun_phrase(rng, scene.objects[subject], subject, cfg, with_position=False)
        second, m2 = _noun_phrase(rng, scene.objects[target], target, cfg, with_position=False)
        body = f"{first} {_choice(rng, RELATIONS[rel])} {second}"
        mentions = [m1, m2]
        if n == 3:
            third, m3 = _noun_phrase(rng, scene.objects[order[2]], order[2], cfg, with_position=True)
            body += f" and {third}"
            mentions.append(m3)
    else:
        parts = [_noun_phrase(rng, scene.objects[i], i, cfg, with_position=True) for i in order]
        body = _join([p for p, _ in parts])
        mentions = [m for _, m in parts]
    if n >= 2 and rng.random() < 0.15:
        text = f"{COUNT_WORDS[n]} {_choice(rng, COUNT_NOUNS)}: {body}"
    else:
        opening = _choice(rng, OPENINGS)
        text = f"{opening} {body}" if opening else body
    mention_background = rng.random() < cfg.background_mention_prob
    if mention_background:
        bg = scene.background
        text += f" on a {_choice(rng, TONES[bg.tone])} {_choice(rng, BACKGROUNDS[bg.kind])} background"
    if rng.random() < 0.5:
        text += "."
    return Caption(text=text, mentions=tuple(mentions), relation=relation, background=mention_background)


def describe_distinct(scene: Scene, rng: np.random.Generator, cfg: WorldConfig, count: int) -> tuple[Caption, ...]:
    """``count`` captions of one scene, paraphrases with different texts where possible."""
    captions: list[Caption] = []
    seen: set[str] = set()
    for _ in range(count * 8):
        caption = describe(scene, rng, cfg)
        if caption.text not in seen:
            seen.add(caption.text)
            captions.append(caption)
        if len(captions) == count:
            break
    while len(captions) < count:  # a tiny vocabulary can run out of paraphrases
        captions.append(describe(scene, rng, cfg))
    return tuple(captions)


# --- samples -----------------------------------------------------------------------------------


def wds_key(index: int, shard_size: int) -> str:
    """img2dataset-style key: 5-digit shard number and 4-digit index within the shard."""
    shard, within = divmod(index, shard_size)
    return f"{shard:05d}{within:04d}"


def make_sample(cfg: WorldConfig, split: str, index: int, captions: int = 1) -> Sample:
    """Sample ``index`` of a caption split (``pretrain``, ``train``, ``test``)."""
    rng = sample_rng(cfg.seed, SPLIT_STREAMS[split], index)
    scene = sample_scene(rng, cfg)
    png = encode_png(render(scene, cfg.image_size, rng))
    caps = describe_distinct(scene, rng, cfg, captions)
    return Sample(key=wds_key(index, cfg.shard_size), png=png, scene=scene, captions=caps)


def make_zeroshot_sample(cfg: WorldConfig, task: str, label: str, index: int) -> Sample:
    """Image ``index`` of a zero-shot task: one object whose ``task`` attribute is ``label``."""
    classes = list(ZEROSHOT_VOCAB[task])
    stream_index = index * len(classes) + classes.index(label)
    rng = sample_rng(cfg.seed, ZEROSHOT_STREAMS[task], stream_index)
    scene = sample_scene(rng, cfg, fixed={task: label})
    png = encode_png(render(scene, cfg.image_size, rng))
    return Sample(key=f"{task}_{label.replace(' ', '_')}_{index:05d}", png=png, scene=scene)


def class_folder(label: str) -> str:
    """Folder name of a class in an image-folder tree (no spaces)."""
    return label.replace(" ", "_")


def vocabulary() -> dict:
    """The world's vocabulary, for world.json."""
    return {
        "shapes": {k: list(v) for k, v in SHAPES.items()},
        "generic_nouns": list(GENERIC_NOUNS),
        "colours": {k: {"rgb": list(rgb), "words": list(w)} for k, (rgb, w) in COLOURS.items()},
        "sizes": {k: {"radius": r, "words": list(w)} for k, (r, w) in SIZES.items()},
        "positions": {k: {"centre": list(c), "words": list(w)} for k, (c, _, w) in POSITIONS.items()},
        "relations": {k: list(v) for k, v in RELATIONS.items()},
        "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()},
        "openings": [o for o in OPENINGS if o],
    }
