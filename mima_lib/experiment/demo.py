"""The teaching demo behind notebooks/demo_widgets: erase, immunize, attack, compare side by side.

Everything runs on the embedded toy model in about a minute on a laptop CPU:
erase the chosen concepts (UCE), immunize the erased model (MIMA or a baseline), then let a LoRA attacker
re-learn each concept on the erased model with and without immunization. Snapshots at fixed seeds make the
two attacks comparable image by image.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..attacks import run_attack
from ..evaluation.plots import image_grid, labelled_grid, plot_lines
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
    seconds: dict = field(default_factory=dict)  # phase -> wall seconds (erase, immunize, attack, total)


def erased_pipeline(concepts: list[str]):
    """The toy model with the concepts erased as the experiment's erasure stage erases them."""
    pipe = load_toy_pipeline()
    erase_concepts(pipe, **uce_arguments(ExperimentConfig(concepts=list(concepts))))
    return pipe


def run_demo(concepts: list[str], method: str = "mima", immunize_steps: int = 10, attack_steps: int = 40,
             n_images: int = 4, snapshot_every: int = 20, progress: bool = True) -> DemoResult:
    """Erase, immunize with `method` ('mima', 'imma-joint', 'imma-sequential'), attack, and collect snapshots.
    The defaults are sized for one click of the demo on 2 CPU cores (scripts/time_demo.py measures it)."""
    if not concepts:
        raise ValueError("pick at least one concept")
    t0 = time.perf_counter()
    steps = list(range(0, attack_steps + 1, snapshot_every))
    if steps[-1] != attack_steps:
        steps.append(attack_steps)
    result = DemoResult(list(concepts), method, steps)
    base = erased_pipeline(concepts)
    immunized = erased_pipeline(concepts)
    result.seconds["erase"] = time.perf_counter() - t0
    data = {c: toy_attack_data(c) for c in concepts}
    train_images = {toyworld.concept(c).prompt: toyworld.render_many(c, 8, 40_000) for c in concepts}
    t = time.perf_counter()
    immunize(immunized, train_images, None, None,
             ImmunizeConfig.toy(method=method, steps=immunize_steps, prior_weight=0.0),
             reg_captions=word_captions(), progress=progress)
    result.seconds["immunize"] = time.perf_counter() - t
    t = time.perf_counter()
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
    result.seconds["attack"] = time.perf_counter() - t
    result.seconds["total"] = time.perf_counter() - t0
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


def before_after(result: DemoResult, step: int | None = None):
    """Rows: concepts; columns: the attacker's images at ``step`` (default: the last) on the erased model
    without immunization, then on the immunized one (the same seeds)."""
    step = result.steps[-1] if step is None else step
    n = len(result.no_defense[result.concepts[0]][step])
    images = [im for c in result.concepts
              for im in tensor_to_images(result.no_defense[c][step]) + tensor_to_images(result.immunized[c][step])]
    return labelled_grid(images, list(result.concepts),
                         [f"no defense {k}" for k in range(n)] + [f"{result.method} {k}" for k in range(n)])


def attack_curves(result: DemoResult):
    """One panel per concept: the oracle's accuracy against the LoRA step, with and without immunization."""
    panels = {c: {which: {s: result.accuracy[(which, c, s)] for s in result.steps}
                  for which in ("no defense", result.method)} for c in result.concepts}
    return plot_lines(panels, "LoRA attack step", "oracle accuracy", percent=True, title="is the concept back?")


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


__all__ = ["run_demo", "side_by_side", "before_after", "attack_curves", "preview", "accuracy_table", "DemoResult"]
