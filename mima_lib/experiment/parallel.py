"""Concept-parallel MIMA on the embedded toy model, one process per GPU (or CPU process), through accelerate:

    accelerate launch --multi_gpu --num_processes 8 -m mima_lib.experiment.parallel --concepts cat dog car ...
    accelerate launch --multi_gpu --num_processes 2 -m mima_lib.experiment.parallel --cpu --concepts cat "van gogh"

The method is :func:`mima_lib.method.distributed.immunize_distributed`; this command gives it the toy world's
renders and writes save_immunized's folder.
"""
from __future__ import annotations

import argparse

from ..method.distributed import immunize_distributed
from ..method.immunize import ImmunizeConfig, save_immunized
from ..method.pipeline import load_pipeline
from ..toy import data as toy_data
from ..toy.model import load_toy_pipeline
from ..toy import world


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mima_lib.experiment.parallel",
                                description="Concept-parallel MIMA on the embedded toy model (launch it with "
                                            "`accelerate launch`); writes save_immunized's folder.")
    p.add_argument("--model", default="toy", help="'toy' or a diffusers folder whose images the toy world fits")
    p.add_argument("--concepts", nargs="+", default=["cat", "van gogh"], help="toy-world concept names")
    p.add_argument("--images", type=int, default=8, help="images per concept")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--order", type=int, default=2)
    p.add_argument("--hvp-scheme", default="central", choices=("central", "forward", "jvp"))
    p.add_argument("--cpu", action="store_true", help="run the processes on the CPU (gloo)")
    p.add_argument("--out", default=None, help="folder for immunized.safetensors / immunize.json")
    p.add_argument("--checkpoint-dir", default=None)
    return p


def main(argv=None) -> int:
    from accelerate import Accelerator

    args = _parser().parse_args(argv)
    acc = Accelerator(cpu=args.cpu)
    pipe = load_toy_pipeline() if args.model == "toy" else load_pipeline(args.model)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    concepts = {world.concept(c).prompt: world.render_many(c, args.images, size=size) for c in args.concepts}
    reg = {world.GENERIC_OBJECT_PROMPT: world.render_many("object", args.images, size=size),
           world.GENERIC_ARTWORK_PROMPT: world.render_many("artwork", args.images, size=size)}
    # outer_rows='all': the selective projection is not implemented for the streamed step
    cfg = ImmunizeConfig.toy(steps=args.steps, order=args.order, hypergrad="hvp", hvp_scheme=args.hvp_scheme,
                             outer_rows="all", checkpoint_every=5 if args.checkpoint_dir else 0)
    res = immunize_distributed(pipe, concepts, reg, None, cfg, checkpoint_dir=args.checkpoint_dir,
                               reg_captions=toy_data.word_captions(), accelerator=acc)
    if acc.is_main_process:
        print(f"{acc.num_processes} process(es), {len(concepts)} concepts: loss {res.losses[0]:.4f} -> "
              f"{res.losses[-1]:.4f}, {res.seconds_per_step:.2f} s/step")
        if args.out:
            print(f"wrote {save_immunized(res, args.out)}")
    acc.wait_for_everyone()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
