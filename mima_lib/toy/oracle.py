"""The toy world's oracle: a small CNN trained on renders, our stand-in for CLIP/DINO.

It classifies an image into one of the toy world's concepts and its penultimate layer is a feature
embedding. Accuracy is always measured within a concept's kind (objects among objects and instances,
artists among artists), which makes chance 1/13 for objects and 1/10 for artists. Besides the concepts and
each kind's "nothing", the oracle has one label that every kind may answer: "noise" (render_noise), what a
broken model draws. Without it, the oracle must pick a concept for noise, and read an immunized model's blue
noise as van gogh (100% of 16, scripts/toy_bars.py on the v4 model).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from ..evaluation.features import EmbeddingExtractor
from ..method.diffusion import images_to_tensor
from ..method.training import TrainConfig, train
from . import world

# MIMA_TOY_ORACLE points at a rebuilt oracle (python -m mima_lib.toy.build --out DIR)
TOY_ORACLE = Path(os.environ.get("MIMA_TOY_ORACLE", Path(__file__).parent / "assets" / "toy_oracle"))
NOISE = "noise"  # the label (and kind) of render_noise's images


class OracleNet(nn.Module):
    def __init__(self, n_labels: int, width: int = 48, feature_dim: int = 128):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.feature = nn.Linear(4 * width, feature_dim)
        self.head = nn.Linear(feature_dim, n_labels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x).mean((2, 3))
        return F.relu(self.feature(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ToyOracle:
    """Concept classifier + embedding for toy-world images (PIL images or [-1,1] tensors)."""

    def __init__(self, net: OracleNet, labels: list[str], kinds: list[str]):
        self.net, self.labels, self.kinds = net.eval(), labels, kinds

    @torch.no_grad()
    def logits(self, images, batch_size: int = 256) -> torch.Tensor:
        x = images_to_tensor(images).float()
        return torch.cat([self.net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def embed(self, images, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised features, used like CLIP/DINO image embeddings for SGR."""
        x = images_to_tensor(images).float()
        f = torch.cat([self.net.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        return F.normalize(f, dim=1)

    def predict(self, images, kind: str | None = None) -> list[str]:
        """Top-1 concept names; with kind, only among concepts of that kind ('object' covers instances) and
        "noise"."""
        logits = self.logits(images)
        if kind is not None:
            allowed = torch.tensor([k == NOISE or self._kind_group(k) == self._kind_group(kind)
                                    for k in self.kinds])
            logits = logits.masked_fill(~allowed, float("-inf"))
        return [self.labels[i] for i in logits.argmax(1).tolist()]

    def accuracy(self, images, concept_name: str) -> float:
        """Fraction of images recognised as concept_name among concepts of its kind."""
        c = world.concept(concept_name)
        pred = self.predict(images, c.kind)
        return float(np.mean([p == c.name for p in pred]))

    @staticmethod
    def _kind_group(kind: str) -> str:
        return "artist" if kind == "artist" else "object"

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, folder / "oracle.safetensors")
        (folder / "oracle.json").write_text(json.dumps({"labels": self.labels, "kinds": self.kinds}, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> "ToyOracle":
        folder = Path(folder)
        if not (folder / "oracle.safetensors").exists():
            raise FileNotFoundError(f"no oracle weights in {folder}; build them with "
                                    "`python -m mima_lib.toy.build --stage oracle`")
        meta = json.loads((folder / "oracle.json").read_text())
        net = OracleNet(len(meta["labels"]))
        net.load_state_dict(load_file(folder / "oracle.safetensors"))
        return cls(net, meta["labels"], meta["kinds"])


def load_toy_oracle() -> ToyOracle:
    """The committed oracle of the embedded default."""
    return ToyOracle.load(TOY_ORACLE)


class OracleExtractor(EmbeddingExtractor):
    """The toy oracle's L2-normalised embedding (the embedded default's CLIP/DINO stand-in for SGR)."""

    def __init__(self, oracle: ToyOracle | None = None):
        self.oracle, self.name = oracle or load_toy_oracle(), "oracle"

    def embed(self, images) -> torch.Tensor:
        return self.oracle.embed(images)


def oracle_scorer(oracle: ToyOracle):
    """A utility scorer (mima_lib.evaluation.metrics.Scorer): per image 1/0, does the oracle recognise the
    image's concept (within its kind)? The concept is given, or read from a toy-world prompt."""

    def score(images, prompts, concept: str | None = None) -> np.ndarray:
        names = [concept] * len(prompts) if concept else [_prompt_concept(p) for p in prompts]
        out = np.zeros(len(names))
        for name in set(names):
            idx = [i for i, n in enumerate(names) if n == name]
            pred = oracle.predict(images[idx] if isinstance(images, torch.Tensor) else [images[i] for i in idx],
                                  world.concept(name).kind)
            out[idx] = [p == world.concept(name).name for p in pred]
        return out

    return score


def _prompt_concept(prompt: str) -> str:
    c = world.concept_of_prompt(prompt)
    if c is None:
        raise ValueError(f"the oracle scorer cannot tell which concept {prompt!r} shows; pass concept=")
    return c.name


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, noise and colour shifts, so the oracle also reads the softer images a diffusion model makes."""
    b = x.shape[0]
    blur = torch.rand(b, generator=gen) < 0.5
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        x = torch.where(blur[:, None, None, None], F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3), x)
    x = x + 0.08 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    x = x * (1 + 0.1 * torch.randn(b, 3, 1, 1, generator=gen)) + 0.05 * torch.randn(b, 3, 1, 1, generator=gen)
    return x.clamp(-1, 1)


def oracle_labels() -> tuple[list[str], list[str]]:
    """(labels, kinds): every concept of the world, 'no object' and 'no artwork' (world.NOTHING), "noise"."""
    concepts = world.all_concepts()
    return ([c.name for c in concepts] + list(world.NOTHING.values()) + [NOISE],
            [c.kind for c in concepts] + list(world.NOTHING) + [NOISE])


def render_noise(seed: int, size: int = 32) -> Image.Image:
    """What a broken model draws: a colour field of one to three octaves of smooth random noise (4 to 16
    cells a side, then 2 to 16), through a random colour map (two to four random colours, or one gain per channel),
    saturated, sometimes with fine grain. It is no render of the world, so the oracle learns "noise" from
    everything that has no object, backdrop or brushwork in it."""
    rng = np.random.default_rng(seed + 7_919_000)
    field = np.zeros((size, size, 1 if rng.uniform() < 0.6 else 3), np.float32)
    for octave in range(int(rng.integers(1, 4))):
        # no octave coarser than 4 cells alone: a smooth gradient is a photo's backdrop, not noise
        cells = int(rng.choice([4, 6, 8, 12, 16] if octave == 0 else [2, 3, 4, 6, 8, 12, 16]))
        coarse = rng.normal(size=(cells, cells, field.shape[2])).astype(np.float32)
        up = np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize(
            (size, size), Image.BICUBIC if rng.uniform() < 0.7 else Image.NEAREST)) for c in range(field.shape[2])], -1)
        field += rng.uniform(0.3, 1.0) * up
    field = np.tanh(rng.uniform(0.7, 3.0) * field / (field.std() + 1e-6))  # saturated, in (-1, 1)
    if field.shape[2] == 1:  # a random colour map along the field
        k = int(rng.integers(2, 5))
        colours = rng.uniform(0, 1, (k, 3)).astype(np.float32)
        t = (field[..., 0] + 1) / 2 * (k - 1)
        lo = np.clip(np.floor(t).astype(int), 0, k - 2)
        w = (t - lo)[..., None]
        rgb = (1 - w) * colours[lo] + w * colours[lo + 1]
    else:
        rgb = 0.5 + field * rng.uniform(0.2, 0.5, 3) + rng.uniform(-0.3, 0.3, 3)
    if rng.uniform() < 0.4:
        rgb = rgb + rng.uniform(0.03, 0.15) * rng.normal(size=rgb.shape)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def render_labelled(per_concept: int, start_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """per_concept renders of every label: each concept, and images of no object / no artwork and noise
    (twice as many: they stand for everything that is not a concept)."""
    images, labels = [], []
    concepts = world.all_concepts()
    for i, c in enumerate(concepts):
        images += world.render_many(c.name, per_concept, start_seed)
        labels += [i] * per_concept
    for i, kind in enumerate(world.NOTHING, start=len(concepts)):  # the order of oracle_labels()
        images += [world.render_nothing(kind, start_seed + j) for j in range(2 * per_concept)]
        labels += [i] * (2 * per_concept)
    images += [render_noise(start_seed + j) for j in range(2 * per_concept)]
    labels += [len(concepts) + len(world.NOTHING)] * (2 * per_concept)
    return images_to_tensor(images), torch.tensor(labels)


def train_oracle(per_concept: int = 300, steps: int = 1500, batch_size: int = 128, seed: int = 0,
                 progress: bool = True) -> ToyOracle:
    """Train the oracle on fresh renders of every concept (seeds 10_000 + i, disjoint from data seeds)."""
    labels, kinds = oracle_labels()
    x, y = render_labelled(per_concept, start_seed=10_000)
    torch.manual_seed(seed)
    net = OracleNet(len(labels))

    def step_fn(step, gen):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        return F.cross_entropy(net(augment(x[idx], gen)), y[idx])

    net.train()
    train(step_fn, dict(net.named_parameters()),
          TrainConfig(steps=steps, lr=2e-3, schedule="cosine", warmup=50, seed=seed, desc="oracle"),
          progress=progress)
    return ToyOracle(net.eval(), labels, kinds)


def held_out_accuracy(oracle: ToyOracle, per_concept: int = 30, start_seed: int = 50_000) -> dict[str, float]:
    """Per-concept accuracy on renders the oracle never saw, and on images of no object / no artwork (where
    the oracle has those labels)."""
    acc = {c.name: oracle.accuracy(world.render_many(c.name, per_concept, start_seed), c.name)
           for c in world.all_concepts()}
    for kind, label in world.NOTHING.items():
        if label not in oracle.labels:  # an oracle of the first build: it has no "nothing" labels
            continue
        pred = oracle.predict([world.render_nothing(kind, start_seed + j) for j in range(per_concept)], kind)
        acc[label] = float(np.mean([p == label for p in pred]))
    if NOISE in oracle.labels:
        acc[NOISE] = float(np.mean([p == NOISE for p in oracle.predict(
            [render_noise(start_seed + j) for j in range(per_concept)])]))
    return acc
