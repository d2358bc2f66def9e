"""Concept-parallel MIMA on several processes (GPUs, or CPU processes with gloo), through accelerate.

Every process holds the whole model and draws every random number of the step (so each concept sees the
noise it would see in one process), but runs the forward/backward passes only for its share of the concepts
(round-robin): its simulated attacks, its upper-level chunks and its Hessian-vector products
(:mod:`mima_lib.method.hypergrad`). Per step four sums cross the processes: the merge inputs (the mean-merged
parameter deltas and the K/V targets V_n, a "gather" by summing zero-padded buffers), g* = dJ/dtheta*
(order 2 only), the finite-difference step sizes, and the upper-level gradient on S_u. Every process then
applies the same optimizer step, so the weights stay identical without a broadcast.

Launch (one process per GPU)::

    accelerate launch --multi_gpu --num_processes 8 -m mima_lib.experiment.parallel --concepts cat dog car ...

and on CPU, for testing (accelerate's ``--cpu`` launches a single process unless MPI is set up, so ask for
the multi-process launcher and put the processes on the CPU)::

    accelerate launch --multi_gpu --num_processes 2 -m mima_lib.experiment.parallel --cpu --concepts cat "van gogh"

From Python, call :func:`immunize_distributed` in the launched script instead of
:func:`mima_lib.method.immunize.immunize`; it needs ``hypergrad='hvp'``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .hypergrad_plan import Comm
from .immunize import ImmunizeConfig, ImmunizeResult, immunize

__all__ = ["TorchComm", "immunize_distributed"]


class TorchComm(Comm):
    """:class:`mima_lib.method.hypergrad_plan.Comm` over an initialised torch.distributed process group.

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
    """:func:`mima_lib.method.immunize.immunize`, concept-parallel over the processes of ``accelerator`` (default:
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
