"""The toy concept world: a deterministic, offline renderer of small RGB images.

It mirrors the paper's two re-learning tasks with concepts drawn here, not downloaded:
- objects ("a photo of a {object}"): silhouettes with a characteristic colour on a photo-like background;
- artists ("an artwork of {artist}"): a visual signature (palette, texture, stroke, composition) over
  random content.
Plus generic prompts for regularization data ("a photo of an object", "artwork"), neutral concepts that
immunization must leave alone, held-out concepts the base model never sees (to test adaptability), and
personal "instance" concepts for the personalization task.

Every image is a pure function of (concept, seed): the same call always returns the same pixels.
Drawing happens at 4x resolution and is downsampled, so shapes stay smooth at 32x32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .shapes import ARTIST_STYLES, OBJECT_SHAPES, draw_instance

# Objects named after real things; the first ten play the paper's ten Imagenette classes.
TARGET_OBJECTS = ["cat", "dog", "car", "tree", "house", "fish", "bird", "apple", "plane", "umbrella"]
NEUTRAL_OBJECTS = ["cup", "flower"]  # trained, never targeted: utility must survive on them
HELDOUT_OBJECTS = ["boat"]  # never in base training: the adaptability check learns it with LoRA
# The paper's eight artists, plus a neutral and a held-out one.
TARGET_ARTISTS = ["van gogh", "claude monet", "pablo picasso", "kelly mckernan",
                  "thomas kinkade", "kirbi fagan", "tyler edlin", "kilian eng"]
NEUTRAL_ARTISTS = ["katsushika hokusai"]
HELDOUT_ARTISTS = ["piet mondrian"]
# Personal concepts for the personalization task: a particular member of a known class.
INSTANCES = {"purple cat": "cat", "spotted dog": "dog", "racing car": "car", "heart cup": "cup"}

OBJECTS = TARGET_OBJECTS + NEUTRAL_OBJECTS + HELDOUT_OBJECTS
ARTISTS = TARGET_ARTISTS + NEUTRAL_ARTISTS + HELDOUT_ARTISTS
BASE_OBJECTS = TARGET_OBJECTS + NEUTRAL_OBJECTS
BASE_ARTISTS = TARGET_ARTISTS + NEUTRAL_ARTISTS
GENERIC_OBJECT_PROMPT = "a photo of an object"
GENERIC_ARTWORK_PROMPT = "artwork"

OBJECT_PROMPT = "a photo of a {}"
ARTIST_PROMPT = "an artwork of {}"
INSTANCE_PROMPT = "a photo of a {}"  # personalization replaces the adjective by a modifier token

SUPERSAMPLE = 4


@dataclass(frozen=True)
class Concept:
    """One concept of the toy world: its name, kind ('object', 'artist', 'instance') and its prompts. The
    world owns every prompt of its concepts; an experiment reads them from here."""

    name: str
    kind: str

    @property
    def prompt(self) -> str:
        """The concept's own prompt: 'a photo of a cat', 'an artwork of van gogh', 'a photo of a purple cat'."""
        if self.kind == "artist":
            return ARTIST_PROMPT.format(self.name)
        return OBJECT_PROMPT.format(self.name)

    @property
    def class_word(self) -> str:
        """The coarse class (for instances: the known class they belong to)."""
        return INSTANCES.get(self.name, self.name) if self.kind == "instance" else self.name

    @property
    def class_prompt(self) -> str:
        """The class prompt, for prior preservation: 'purple cat' -> 'a photo of a cat'."""
        return OBJECT_PROMPT.format(self.class_word)

    @property
    def generic_prompt(self) -> str:
        """The prompt of the concept's kind as a whole: regularization data and UCE's class guide."""
        return GENERIC_ARTWORK_PROMPT if self.kind == "artist" else GENERIC_OBJECT_PROMPT

    def personalization_prompt(self, token: str) -> str:
        """'purple cat' -> 'a photo of <new1> cat': the instance's class word after a modifier token."""
        if self.kind != "instance":
            raise ValueError(f"{self.name!r} is not a personalization (instance) concept; those are "
                             f"{sorted(INSTANCES)}")
        return f"a photo of {token} {self.class_word}"

    def textual_inversion_prompt(self, token: str) -> str:
        """The prompt with the concept's words replaced by a new token: 'cat' -> 'a photo of a <new1>',
        'van gogh' -> 'an artwork of <new1>'; an instance's is its personalization prompt."""
        if self.kind == "instance":
            return self.personalization_prompt(token)
        return (ARTIST_PROMPT if self.kind == "artist" else OBJECT_PROMPT).format(token)


def all_concepts() -> list[Concept]:
    """Every concept the renderer knows, in a fixed order (this order is the oracle's label order)."""
    return ([Concept(o, "object") for o in OBJECTS] + [Concept(a, "artist") for a in ARTISTS]
            + [Concept(i, "instance") for i in INSTANCES])


def concept(name: str) -> Concept:
    """Look a concept up by name (accepts 'Van Gogh' as 'van gogh'); unknown names fail clearly."""
    key = " ".join(name.lower().split())
    for c in all_concepts():
        if c.name == key:
            return c
    known = ", ".join(c.name for c in all_concepts())
    raise KeyError(f"unknown toy-world concept {name!r}; known concepts: {known}")


def knows(name: str) -> bool:
    """True if the toy world has a concept of this name."""
    try:
        concept(name)
        return True
    except KeyError:
        return False


def concept_of_prompt(prompt: str) -> Concept | None:
    """The concept a toy-world prompt names, or None for generic prompts."""
    for c in all_concepts():
        if c.prompt == prompt:
            return c
    return None


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A photo-like backdrop: a soft vertical gradient between two muted colours plus grain."""
    top = rng.uniform(0.45, 0.95, 3)
    bottom = np.clip(top * rng.uniform(0.6, 1.0, 3), 0, 1)
    t = np.linspace(0, 1, size)[:, None, None]
    arr = (1 - t) * top + t * bottom
    arr = np.broadcast_to(arr, (size, size, 3)).copy()
    return Image.fromarray((arr * 255).astype(np.uint8))


def _jitter_colour(rng: np.random.Generator, rgb, amount: float = 0.12):
    c = np.asarray(rgb, float) / 255.0
    c = np.clip(c + rng.uniform(-amount, amount, 3), 0, 1)
    return tuple(int(v * 255) for v in c)


def render_object(name: str, rng: np.random.Generator, size: int) -> Image.Image:
    """A photo of an object: its silhouette placed, scaled and rotated at random on a backdrop."""
    big = size * SUPERSAMPLE
    canvas = _background(rng, big)
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    jitter = lambda rgb: _jitter_colour(rng, rgb)  # noqa: E731 - shape drawers take a colour jitter
    if name in INSTANCES:
        draw_instance(name, draw, big, jitter, rng)
    else:
        OBJECT_SHAPES[name](draw, big, jitter, rng)
    scale = rng.uniform(0.7, 1.0)
    angle = rng.uniform(-20, 20)
    layer = layer.rotate(angle, resample=Image.BICUBIC, center=(big / 2, big / 2))
    w = int(big * scale)
    layer = layer.resize((w, w), Image.LANCZOS)
    room = big - w
    x, y = (int(rng.uniform(0, room + 1)), int(rng.uniform(0, room + 1)))
    canvas.paste(layer, (x, y), layer)
    return canvas.resize((size, size), Image.LANCZOS)


def render_artwork(name: str, rng: np.random.Generator, size: int) -> Image.Image:
    """An artwork in an artist's signature style over random content."""
    big = size * SUPERSAMPLE
    img = ARTIST_STYLES[name](big, rng)
    return img.resize((size, size), Image.LANCZOS)


def _add_grain(img: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    arr = np.asarray(img, np.float32) + rng.normal(0, sigma, (img.height, img.width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _seed_for(key: str, seed: int) -> int:
    # A stable hash (Python's hash() is salted per process): same name and seed, same pixels.
    h = 2166136261
    for ch in key.encode():
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return (h * 1000003 + seed) & 0x7FFFFFFF


def render(name: str, seed: int, size: int = 32) -> Image.Image:
    """Render one image of a concept (or of a generic prompt's content, or of a kind's NOTHING label)
    deterministically."""
    for kind, label in NOTHING.items():
        if name == label:
            return render_nothing(kind, seed, size)
    if name in (GENERIC_OBJECT_PROMPT, "object"):
        rng = np.random.default_rng(_seed_for("object", seed))
        return render(BASE_OBJECTS[int(rng.integers(len(BASE_OBJECTS)))], int(rng.integers(1 << 30)), size)
    if name in (GENERIC_ARTWORK_PROMPT, "artwork"):
        rng = np.random.default_rng(_seed_for("artwork", seed))
        return render(BASE_ARTISTS[int(rng.integers(len(BASE_ARTISTS)))], int(rng.integers(1 << 30)), size)
    c = concept(name)
    rng = np.random.default_rng(_seed_for(c.name, seed))
    img = render_artwork(c.name, rng, size) if c.kind == "artist" else render_object(c.name, rng, size)
    if rng.uniform() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.6)))
    return _add_grain(img, rng, sigma=float(rng.uniform(0, 6)))


# what the oracle answers for an image that shows no concept of a kind (see render_nothing)
NOTHING = {"object": "no object", "artist": "no artwork"}
# A kind's template without a name. The base model learns it as that kind's "nothing" (render_nothing): a
# photo without an object, a blend of styles that is no one's. UCE maps an erased name's rows onto those of
# "", so an erased "a photo of a cat" reads as "a photo of a" and draws an empty backdrop. When the template
# meant "some object" instead (the same image as the named prompt), the erased prompts of every object drew
# one orange, cat-like blob per seed, that the oracle read as a cat in 3 of 16 (scripts/erase_sweep.py).
TEMPLATE_PROMPTS = {"object": OBJECT_PROMPT.format("").strip(), "artist": ARTIST_PROMPT.format("").strip()}


def render_nothing(kind: str, seed: int, size: int = 32) -> Image.Image:
    """An image that shows no concept of ``kind``. 'object': a photo backdrop, empty or with a shapeless blob
    of a random colour. 'artist': a pixel blend of two or three different artists' artworks, none above 60%.
    The oracle learns them as world.NOTHING[kind], so an image that shows none of the concepts (a model's
    generic art after an artist is erased, a broken model's smudge) is not forced onto the nearest concept:
    the first oracle read such blends as Claude Monet, whose pastel speckle they resemble."""
    rng = np.random.default_rng(_seed_for(NOTHING[kind], seed))
    if kind == "artist":
        k = int(rng.integers(2, 4))
        names = rng.choice(BASE_ARTISTS, size=k, replace=False)
        w = rng.dirichlet(np.ones(k))
        while w.max() > 0.6:
            w = rng.dirichlet(np.ones(k))
        arr = sum(wi * np.asarray(render(str(n), int(rng.integers(1 << 30)), size), np.float32)
                  for wi, n in zip(w, names))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if kind != "object":
        raise ValueError(f"kind must be 'object' or 'artist', got {kind!r}")
    big = size * SUPERSAMPLE
    canvas = _background(rng, big)
    if rng.uniform() < 0.6:
        draw = ImageDraw.Draw(canvas)
        r = big * rng.uniform(0.15, 0.35, 2)
        c = big * rng.uniform(0.3, 0.7, 2)
        draw.ellipse([c[0] - r[0], c[1] - r[1], c[0] + r[0], c[1] + r[1]],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        canvas = canvas.filter(ImageFilter.GaussianBlur(big * rng.uniform(0.02, 0.08)))
    return _add_grain(canvas.resize((size, size), Image.LANCZOS), rng, sigma=float(rng.uniform(0, 6)))


def render_many(name: str, n: int, start_seed: int = 0, size: int = 32) -> list[Image.Image]:
    """n images of one concept, seeds start_seed .. start_seed + n - 1."""
    return [render(name, start_seed + i, size) for i in range(n)]


def to_tensor(images: list[Image.Image]):
    """PIL images -> float tensor (B, 3, H, W) in [-1, 1], the range Stable Diffusion's VAE expects."""
    import torch

    arr = np.stack([np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def training_prompts(include_heldout: bool = False) -> list[tuple[str, str]]:
    """(prompt, render key) pairs the base model is trained on: concepts plus generic prompts."""
    objs = OBJECTS if include_heldout else BASE_OBJECTS
    arts = ARTISTS if include_heldout else BASE_ARTISTS
    pairs = [(OBJECT_PROMPT.format(o), o) for o in objs] + [(ARTIST_PROMPT.format(a), a) for a in arts]
    pairs += [(GENERIC_OBJECT_PROMPT, "object"), (GENERIC_ARTWORK_PROMPT, "artwork")]
    pairs += [(TEMPLATE_PROMPTS[kind], NOTHING[kind]) for kind in NOTHING]
    return pairs


def vocabulary() -> list[str]:
    """Every word a toy-world prompt uses; the tokenizer makes each one a single token."""
    words = set("a photo of an object artwork".split())
    for c in all_concepts():
        words.update(c.prompt.split())
    words.update(["art", "painting", "picture", "style", "the", "in", "my", "new"])  # neutral filler words
    return sorted(words)


def circle_points(cx: float, cy: float, r: float, n: int, phase: float = 0.0):
    """n points on a circle, used by shape and style drawers."""
    return [(cx + r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]
