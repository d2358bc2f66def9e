"""Demo: erase 4 toy-world concepts (2 objects, 2 artists) with UCE, immunize the erased model with MIMA and
with the IMMA-inspired baselines, and print the merged simulated-attack losses and the time per step.

    cd /work/main && OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. .venv/bin/python scripts/demo_immunize.py
    ... scripts/demo_immunize.py --steps 20 --order 1 --guide empty --out runs/demo_immunize

"merged attack" = from the model's weights, one attacker step (SGD on S_l) per concept, then Custom
Diffusion's merge of the four adapted copies: the quantity MIMA's upper level ascends. Higher is better
for the targets; the other concepts' plain loss should not move. All losses on fixed noise.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mima_lib.toy import model as toymodel  # noqa: E402
from mima_lib.toy import world as toyworld  # noqa: E402
from mima_lib.method.erase import erase_concepts  # noqa: E402
from mima_lib.method.immunize import ImmunizeConfig, immunize, save_immunized  # noqa: E402
from mima_lib.method.bilevel import attack_losses, concept_losses  # noqa: E402

OBJECTS, ARTISTS = ["cat", "dog"], ["van gogh", "claude monet"]
OTHERS = ["cup", "flower", "car", "katsushika hokusai", "pablo picasso"]  # never targeted here


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="outer steps of mima and imma-joint")
    ap.add_argument("--seq-steps", type=int, default=None,
                    help="imma-sequential steps per concept (default steps/4: the same number of updates)")
    ap.add_argument("--order", type=int, default=2, choices=[1, 2])
    ap.add_argument("--methods", nargs="+", default=["mima", "imma-sequential", "imma-joint"])
    ap.add_argument("--guide", choices=["generic", "empty"], default="generic",
                    help="erase toward 'a photo of an object'/'artwork' (generic) or the empty prompt")
    ap.add_argument("--images", type=int, default=12, help="immunization images per concept")
    ap.add_argument("--untrained", action="store_true", help="use a random toy pipeline (development only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder to save each method's immunized weights")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.untrained:
        pipe = toymodel.build_pipeline()
    else:
        from mima_lib.toy.model import load_toy_pipeline

        pipe = load_toy_pipeline()
    obj_guide, art_guide = ("", "") if args.guide == "empty" else (toyworld.GENERIC_OBJECT_PROMPT,
                                                                    toyworld.GENERIC_ARTWORK_PROMPT)
    others = [toyworld.concept(c).prompt for c in OTHERS]
    erase_concepts(pipe, [toyworld.concept(c).prompt for c in OBJECTS], obj_guide, preserve_prompts=others)
    erase_concepts(pipe, [toyworld.concept(c).prompt for c in ARTISTS], art_guide, preserve_prompts=others)
    print(f"erased {OBJECTS + ARTISTS} with UCE toward {obj_guide!r} / {art_guide!r}")

    targets = {toyworld.concept(c).prompt: toyworld.render_many(c, args.images) for c in OBJECTS + ARTISTS}
    evaluation = {toyworld.concept(c).prompt: toyworld.render_many(c, 8, start_seed=1000) for c in OBJECTS + ARTISTS}
    held = {p: toyworld.render_many(c, 8, start_seed=1000) for c, p in zip(OTHERS, others)}
    reg = {toyworld.GENERIC_OBJECT_PROMPT: toyworld.render_many("object", args.images),
           toyworld.GENERIC_ARTWORK_PROMPT: toyworld.render_many("artwork", args.images)}
    cfg = ImmunizeConfig.toy(steps=args.steps, order=args.order)
    erased_state = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}

    def measure():
        att = attack_losses(pipe, evaluation, cfg)
        return att["merged"], att["plain"], concept_losses(pipe, held)

    rows = {"erased": measure()}
    timing = {}
    for method in args.methods:
        pipe.unet.load_state_dict(erased_state)
        t0 = time.perf_counter()
        steps = (args.seq_steps or max(1, args.steps // len(targets))) if method == "imma-sequential" else args.steps
        res = immunize(pipe, targets, reg, None, replace(cfg, method=method, steps=steps))
        timing[method] = (res.seconds_per_step, len(res.losses), time.perf_counter() - t0)
        rows[method] = measure()
        if args.out:
            save_immunized(res, os.path.join(args.out, method))

    names = list(rows)
    print(f"\nsettings: {cfg}\n")
    print("merged simulated-attack loss on the 4 targets (higher = better protected)")
    print(f"{'concept':34s}" + "".join(f"{n:>17s}" for n in names))
    for p in evaluation:
        print(f"{p:34s}" + "".join(f"{rows[n][0][p]:17.4f}" for n in names))
    mean = {n: sum(rows[n][0].values()) / len(evaluation) for n in names}
    print(f"{'mean':34s}" + "".join(f"{mean[n]:17.4f}" for n in names))
    print("\nplain loss (no attack): targets, then concepts that were not targeted (should not move)")
    for p in list(evaluation) + list(held):
        k = 1 if p in evaluation else 2
        print(f"{p:34s}" + "".join(f"{rows[n][k][p]:17.4f}" for n in names))
    print("\ntime per outer step")
    for m, (sps, n, total) in timing.items():
        print(f"  {m:16s} {sps:6.2f} s/step x {n} steps = {total:6.1f} s (order {args.order})")


if __name__ == "__main__":
    main()
