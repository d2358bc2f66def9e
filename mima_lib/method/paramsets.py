"""Parameter sets of a diffusers UNet by name: what the simulated attacker adapts (S_l) and what
immunization changes (S_u); plus the simulated attacker's step: its size (SGD or Adam-scaled) and the
functional LoRA step.

S_l (``inner``):  'xattn-kv' (attn2.to_k/to_v weights), 'xattn' (every attn2 parameter),
                  'unet' (every parameter), 'lora' (a fresh rank-r adapter on the to_q/to_k/to_v/to_out.0
                  projections of every attention layer, as the LoRA attack trains it).
S_u (``outer``):  'xattn' (the paper's choice), 'xattn-kv', 'attn' (attn1 and attn2).
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from .merge import is_cross_attention_kv

__all__ = ["INNER_SETS", "OUTER_SETS", "LORA_TARGETS", "check_set", "select_params", "lora_targets",
           "inner_step_size", "lora_A", "lora_delta", "apply_unet_params"]

INNER_SETS = ("xattn-kv", "xattn", "unet", "lora")
OUTER_SETS = ("xattn", "xattn-kv", "attn")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the LoRA attack's default targets (attacks.lora)

_XATTN = re.compile(r"(^|\.)attn2\.")
_ATTN = re.compile(r"(^|\.)attn[12]\.")
_LORA_W = re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def check_set(which: str, role: str) -> None:
    """Fail early, naming the known sets, when ``which`` is not a parameter set for ``role``."""
    known = INNER_SETS if role == "inner" else OUTER_SETS
    if which not in known:
        what = "inner_params (S_l, what the simulated attacker adapts)" if role == "inner" else \
            "outer_params (S_u, what immunization changes)"
        raise ValueError(f"unknown parameter set {which!r} for {what}; choose one of {', '.join(known)}")


def select_params(unet, which: str, role: str = "outer") -> list[str]:
    """Names (in ``unet.named_parameters()`` order) of the parameters in set ``which``.

    For ``'lora'`` these are the frozen base weights the adapter sits on (their effective weight
    ``W + s B A`` is what the merge and the upper loss see)."""
    check_set(which, role)
    names = [n for n, _ in unet.named_parameters()]
    if which == "unet":
        picked = names
    elif which == "xattn-kv":
        picked = [n for n in names if is_cross_attention_kv(n)]
    elif which == "xattn":
        picked = [n for n in names if _XATTN.search(n)]
    elif which == "attn":
        picked = [n for n in names if _ATTN.search(n)]
    else:  # lora
        picked = lora_targets(unet)
    if not picked:
        raise ValueError(f"parameter set {which!r} is empty for this UNet: it has no matching attention layers "
                         "(a diffusers UNet2DConditionModel with cross-attention is expected)")
    return picked


def lora_targets(unet) -> list[str]:
    return [n for n, _ in unet.named_parameters() if _LORA_W.search(n)]


def inner_step_size(grad: Tensor, lr: float, scaling: str):
    """The simulated attacker's step size on one tensor. 'sgd': ``lr``. 'adam': Adam's first update, whose
    second moment is estimated per tensor (the gradient's mean square) and held constant, so the step stays
    differentiable and moves every tensor by ``lr`` per element in RMS: ``lr / rms(grad)``. The reference code's
    attacker is AdamW at 1e-5: a plain SGD step of that size barely moves SD's weights (issue #13)."""
    if scaling == "sgd":
        return lr
    rms = grad.detach().float().pow(2).mean().sqrt()
    return lr / rms.clamp_min(1e-12).to(grad.dtype)


def lora_A(grad_w: Tensor, rank: int, gen: torch.Generator) -> Tensor:
    """A fresh LoRA down-projection ``A ~ N(0, 1/r^2)`` (peft's 'gaussian' init), drawn on the CPU generator."""
    return torch.randn(rank, grad_w.shape[1], generator=gen, dtype=grad_w.dtype, device="cpu").to(grad_w.device) / rank


def lora_delta(grad_w: Tensor, lr, rank: int, gen: torch.Generator, scale: float = 1.0) -> Tensor:
    """Weight change of one SGD step of a freshly initialised LoRA adapter on a linear layer.

    With effective weight ``W + s B A``, ``B = 0`` and ``A`` from :func:`lora_A`, the gradient w.r.t. ``B``
    is ``s G A^T`` (G = dL/dW) and w.r.t. ``A`` is zero, so one step of size ``lr`` gives
    ``B' = -lr s G A^T`` and ``Delta W = s B' A = -lr s^2 G A^T A``. Differentiable in ``grad_w``.
    """
    A = lora_A(grad_w, rank, gen)
    return -lr * scale * scale * (grad_w @ A.T) @ A


def apply_unet_params(unet, state: dict[str, torch.Tensor]) -> None:
    """Copy saved parameters into a UNet in place, checking that every name and shape belongs to it."""
    own = dict(unet.named_parameters())
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ValueError(f"{len(unknown)} saved parameters are not in this UNet (e.g. {unknown[0]}): "
                         "they were made for another model")
    bad = [k for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"shape mismatch for {bad[0]}: saved {tuple(state[bad[0]].shape)}, model "
                         f"{tuple(own[bad[0]].shape)}; the weights were made for another model")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].device, own[k].dtype))
