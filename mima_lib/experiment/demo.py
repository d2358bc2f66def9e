"""The teaching demo behind notebooks/demo_widgets: erase, immunize, attack, compare side by side.

Everything runs on the embedded toy model in about a minute on a laptop CPU:
erase the chosen concepts (UCE), immunize the erased model (MIMA or a baseline), then let a LoRA attacker
re-learn each concept on the erased model with and without immunization. Snapshots at fixed seeds make the
two attacks comparable image by image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..attacks import run_attack
from ..evaluation.plots import image_grid
from ..method.diffusion import generate, tensor_to_images
from ..method.erase import erase_concepts
from ..method.immunize import ImmunizeConfig, immunize
from ..toy.model import load_toy_pipeline
from ..toy.oracle import load_toy_oracle
from ..toy import world as toyworld
from ..toy.data import toy_attack_data, word_captions
from .config import ExperimentConfig
from .stages.erasure import uce_arguments


@dataclass
class DemoResult:
    concepts: list[str]
    method: str
    steps: list[int]
    no_defense: dict = field(default_factory=dict)  # concept -> {step: images}
    immunized: dict = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)  # (which, concept, step) -> oracle accuracy


def erased_pipeline(concepts: list[str]):
    """The toy model with the concepts erased as the experiment's erasure stage erases them."""
    pipe = load_toy_pipeline()
    erase_concepts(pipe, **uce_arguments(ExperimentConfig(concepts=list(concepts))))
    return pipe


def run_demo(concepts: list[str], method: str = "mima", immunize_steps: int = 20, attack_steps: int = 60,
             n_images: int = 4, snapshot_every: int = 20, progress: bool = True) -> DemoResult:
    """Erase, immunize with `method` ('mima', 'imma-joint', 'imma-sequential'), attack, and collect snapshots."""
    if not concepts:
        raise ValueError("pick at least one concept")
    steps = list(range(0, attack_steps + 1, snapshot_every))
    result = DemoResult(list(concepts), method, steps)
    base = erased_pipeline(concepts)
    immunized = erased_pipeline(concepts)
    data = {c: toy_attack_data(c) for c in concepts}
    train_images = {toyworld.concept(c).prompt: toyworld.render_many(c, 8, 40_000) for c in concepts}
    immunize(immunized, train_images, None, None,
             ImmunizeConfig.toy(method=method, steps=immunize_steps, prior_weight=0.0),
             reg_captions=word_captions(), progress=progress)
    oracle = load_toy_oracle()
    for which, model in (("no defense", base), (method, immunized)):
        store = result.no_defense if which == "no defense" else result.immunized
        for c in concepts:
            images, prompt = data[c]
            attacked = run_attack("lora", model, images, prompt, {"steps": attack_steps, "snapshot_steps": steps},
                                  copy=True, defaults="toy", snapshot_prompts=[prompt] * n_images,
                                  snapshot_seeds=list(range(n_images)), progress=progress)
            store[c] = attacked.snapshots
            for s, ims in attacked.snapshots.items():
                result.accuracy[(which, c, s)] = oracle.accuracy(ims, c)
    return result


def side_by_side(result: DemoResult, step: int, scale: int = 4):
    """Rows: concepts; left: attacked without immunization, right: attacked after immunization."""
    images, labels = [], []
    for c in result.concepts:
        images += tensor_to_images(result.no_defense[c][step]) + tensor_to_images(result.immunized[c][step])
        a0, a1 = result.accuracy[("no defense", c, step)], result.accuracy[(result.method, c, step)]
        labels.append(f"{c} {a0:.0%}|{a1:.0%}")
    n = len(result.no_defense[result.concepts[0]][step])
    return image_grid(images, len(result.concepts), 2 * n, scale=scale, labels=labels)


def preview(concepts: list[str], n: int = 4):
    """What the base model makes for the chosen concepts (before any erasure)."""
    pipe = load_toy_pipeline()
    prompts = [toyworld.concept(c).prompt for c in concepts]
    ims = generate(pipe, [p for p in prompts for _ in range(n)], [s for _ in prompts for s in range(n)])
    return image_grid(ims, len(prompts), n, scale=4, labels=list(concepts))


def accuracy_table(result: DemoResult) -> str:
    rows = ["| concept | step | no defense | " + result.method + " |", "|---|---|---|---|"]
    for c in result.concepts:
        for s in result.steps:
            rows.append(f"| {c} | {s} | {result.accuracy[('no defense', c, s)]:.0%} | "
                        f"{result.accuracy[(result.method, c, s)]:.0%} |")
    return "\n".join(rows)


__all__ = ["run_demo", "side_by_side", "preview", "accuracy_table", "DemoResult"]
