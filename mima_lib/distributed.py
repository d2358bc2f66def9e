"""Concept-parallel MIMA on several processes (GPUs, or CPU processes with gloo), through accelerate.

Every process holds the whole model and draws every random number of the step (so each concept sees the
noise it would see in one process), but runs the forward/backward passes only for its share of the concepts
(round-robin): its simulated attacks, its upper-level chunks and its Hessian-vector products
(:mod:`mima_lib.hypergrad`). Per step four sums cross the processes: the merge inputs (the mean-merged
parameter deltas and the K/V targets V_n, a "gather" by summing zero-padded buffers), g* = dJ/dtheta*
(order 2 only), the finite-difference step sizes, and the upper-level gradient on S_u. Every process then
applies the same optimizer step, so the weights stay identical without a broadcast.

Launch (one process per GPU)::

    accelerate launch --multi_gpu --num_processes 8 -m mima_lib.distributed --concepts cat dog car ...

and on CPU, for testing (accelerate's ``--cpu`` launches a single process unless MPI is set up, so ask for
the multi-process launcher and put the processes on the CPU)::

    accelerate launch --multi_gpu --num_processes 2 -m mima_lib.distributed --cpu --concepts cat "van gogh"

From Python, call :func:`immunize_distributed` in the launched script instead of
:func:`mima_lib.immunize.immunize`; it needs ``hypergrad='hvp'``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from .hypergrad import Comm
from .immunize import ImmunizeConfig, ImmunizeResult, immunize

__all__ = ["TorchComm", "immunize_distributed", "main"]


class TorchComm(Comm):
    """:class:`mima_lib.hypergrad.Comm` over an initialised torch.distributed process group.

    Tensors are summed in flat buckets of one dtype (at most ``bucket_numel`` elements) on ``device`` (a
    CUDA device for NCCL; CPU tensors are copied there and back)."""

    def __init__(self, device: torch.device | str | None = None, group=None, bucket_numel: int = 1 << 25):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: start the script with `accelerate launch` "
                               "(or torchrun) and create an Accelerator first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if device is None:
            nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.device = torch.device(device)
        self.bucket_numel = bucket_numel

    def all_reduce(self, tensors: list[Tensor]) -> None:
        import torch.distributed as dist

        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for ts in by_dtype.values():
            i = 0
            while i < len(ts):
                bucket, n = [], 0
                while i < len(ts) and (not bucket or n + ts[i].numel() <= self.bucket_numel):
                    bucket.append(ts[i])
                    n += ts[i].numel()
                    i += 1
                flat = torch.cat([t.reshape(-1).to(self.device) for t in bucket])
                dist.all_reduce(flat, group=self.group)
                o = 0
                with torch.no_grad():
                    for t in bucket:
                        t.copy_(flat[o:o + t.numel()].view(t.shape))
                        o += t.numel()


def immunize_distributed(pipe, concept_images: dict, reg_images=None, reg_prompt: str | None = None,
                         cfg: ImmunizeConfig | None = None, checkpoint_dir=None,
                         reg_captions: list[str] | None = None, progress: bool = True, on_step=None,
                         accelerator=None) -> ImmunizeResult:
    """:func:`mima_lib.immunize.immunize`, concept-parallel over the processes of ``accelerator`` (default:
    a new ``accelerate.Accelerator()``, which reads what `accelerate launch` set up). Moves ``pipe`` to the
    process's device. Every process returns the same result; only the main one shows a progress bar.
    Checkpoints: the main process writes ``checkpoint_dir``, process r ``checkpoint_dir/rank{r}`` (every
    process resumes from its own, identical, state)."""
    from accelerate import Accelerator

    acc = accelerator if accelerator is not None else Accelerator()
    cfg = cfg or ImmunizeConfig(hypergrad="hvp")
    if cfg.hypergrad != "hvp":
        raise ValueError("concept-parallel immunization needs hypergrad='hvp' (the streamed step); "
                         f"got hypergrad={cfg.hypergrad!r}")
    pipe.to(acc.device)
    comm = TorchComm() if acc.num_processes > 1 else None
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = Path(checkpoint_dir) if acc.is_main_process else Path(checkpoint_dir) / f"rank{acc.process_index}"
    return immunize(pipe, concept_images, reg_images, reg_prompt, cfg, checkpoint_dir=ckpt,
                    reg_captions=reg_captions, progress=progress and acc.is_main_process, on_step=on_step,
                    comm=comm)


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mima_lib.distributed",
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

    from . import toyworld
    from .immunize import save_immunized
    from .models import load_pipeline

    args = _parser().parse_args(argv)
    acc = Accelerator(cpu=args.cpu)
    pipe = load_pipeline(args.model)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    concepts = {toyworld.concept(c).prompt: toyworld.render_many(c, args.images, size=size) for c in args.concepts}
    reg = {toyworld.GENERIC_OBJECT_PROMPT: toyworld.render_many("object", args.images, size=size),
           toyworld.GENERIC_ARTWORK_PROMPT: toyworld.render_many("artwork", args.images, size=size)}
    cfg = ImmunizeConfig.toy(steps=args.steps, order=args.order, hypergrad="hvp", hvp_scheme=args.hvp_scheme,
                             checkpoint_every=5 if args.checkpoint_dir else 0)
    res = immunize_distributed(pipe, concepts, reg, None, cfg, checkpoint_dir=args.checkpoint_dir,
                               accelerator=acc)
    if acc.is_main_process:
        print(f"{acc.num_processes} process(es), {len(concepts)} concepts: loss {res.losses[0]:.4f} -> "
              f"{res.losses[-1]:.4f}, {res.seconds_per_step:.2f} s/step")
        if args.out:
            print(f"wrote {save_immunized(res, args.out)}")
    acc.wait_for_everyone()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
