"""Quality bar of the embedded default, measured with the oracle.

    python -m mima_lib.toy.quality                  # 16 generations per concept, the README's numbers
    python -m mima_lib.toy.quality --adaptability   # plus the held-out LoRA check (a few minutes)

- Recognition: for every concept prompt, n generations at fixed seeds 0..n-1; the oracle's top-1 accuracy
  within the concept's kind. Bar (issue #14): every concept >= 80%, objects and artists each >= 95% on average.
- Adaptability: a LoRA fine-tune on 20 renders of a concept the base model never saw (the held-out object
  'boat' by default) must raise its accuracy from near chance to >= 60%.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..evaluation.plots import image_grid
from ..method.diffusion import generate
from . import world


def recognition(pipe, oracle, concepts: list[str], n: int = 16, steps: int = 25, guidance: float = 5.0,
                progress: bool = False) -> tuple[dict[str, float], "object"]:
    """Per-concept oracle accuracy of n generations; also returns the images (concept-major order)."""
    cs = [world.concept(c) for c in concepts]
    prompts = [c.prompt for c in cs for _ in range(n)]
    seeds = [s for _ in cs for s in range(n)]
    images = generate(pipe, prompts, seeds, steps=steps, guidance=guidance, progress=progress)
    acc = {c.name: oracle.accuracy(images[i * n:(i + 1) * n], c.name) for i, c in enumerate(cs)}
    return acc, images


def summarize(acc: dict[str, float]) -> dict[str, float]:
    objs = [v for k, v in acc.items() if world.concept(k).kind != "artist"]
    arts = [v for k, v in acc.items() if world.concept(k).kind == "artist"]
    return {"objects_mean": float(np.mean(objs)) if objs else float("nan"),
            "artists_mean": float(np.mean(arts)) if arts else float("nan")}


def adaptability(pipe, oracle, concept: str = "boat", steps: int = 400, n_eval: int = 16, lr: float = 1e-3,
                 rank: int = 8, progress: bool = False) -> dict[str, float]:
    """Accuracy on a never-trained concept before and after a LoRA fine-tune on 20 of its renders."""
    from ..attacks import LoraSettings, lora_attack

    c = world.concept(concept)
    images = world.render_many(c.name, 20, start_seed=20_000)  # attacker images, disjoint from eval seeds
    seeds = list(range(n_eval))
    result = lora_attack(pipe, images, c.prompt, LoraSettings.toy(steps=steps, lr=lr, rank=rank),
                         snapshot_steps=(0, steps), snapshot_prompts=[c.prompt] * n_eval, snapshot_seeds=seeds,
                         progress=progress)
    return {"concept": c.name, "steps": steps, "before": oracle.accuracy(result.snapshots[0], c.name),
            "after": oracle.accuracy(result.snapshots[steps], c.name)}


def concept_grid(pipe, concepts: list[str], seeds: int = 8, renders: int = 0, scale: int = 3):
    """Rows = concepts; columns: ``renders`` renders of the toy world (seeds 50_000+, never trained on), then
    ``seeds`` generations at seeds 0..seeds-1 (the picture of the README)."""
    import torch

    prompts = [world.concept(c).prompt for c in concepts for _ in range(seeds)]
    images = generate(pipe, prompts, [s for _ in concepts for s in range(seeds)])
    if renders:
        real = world.to_tensor([im for c in concepts for im in world.render_many(c, renders, 50_000)])
        images = torch.cat([torch.cat([real[i * renders:(i + 1) * renders], images[i * seeds:(i + 1) * seeds]])
                            for i in range(len(concepts))])
    return image_grid(images, len(concepts), renders + seeds, scale=scale, labels=concepts)


def main(argv=None):
    from ..method.pipeline import load_pipeline
    from .model import load_toy_pipeline
    from .oracle import load_toy_oracle

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy", help="'toy' (the embedded default) or a rebuilt model's folder")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--adaptability", action="store_true")
    ap.add_argument("--grid", default=None, help="also write a concept grid PNG here: 4 renders, then 8 generations")
    ap.add_argument("--json", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    pipe = load_toy_pipeline() if args.model == "toy" else load_pipeline(args.model)
    oracle = load_toy_oracle()
    base = world.BASE_OBJECTS + world.BASE_ARTISTS
    acc, _ = recognition(pipe, oracle, base, n=args.n, progress=True)
    report = {"per_concept": acc, **summarize(acc), "n": args.n}
    for k, v in acc.items():
        print(f"{k:>20s}  {v:6.1%}")
    report["pass"] = bool(min(acc.values()) >= 0.8 and report["objects_mean"] >= 0.95 and report["artists_mean"] >= 0.95)
    print(f"objects mean {report['objects_mean']:.1%}, artists mean {report['artists_mean']:.1%} (bars: each "
          f"concept >= 80%, each mean >= 95%): {'pass' if report['pass'] else 'FAIL'}")
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        concept_grid(pipe, base, renders=4).save(args.grid)
        print(f"concept grid: {args.grid}")
    if args.adaptability:
        report["adaptability"] = adaptability(pipe, oracle, progress=True)
        a = report["adaptability"]
        print(f"held-out '{a['concept']}': {a['before']:.1%} -> {a['after']:.1%} after {a['steps']} LoRA steps (bar 60%)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
