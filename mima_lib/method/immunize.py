"""Model immunization: MIMA (Algorithm 1, bi-level with differentiable merge), IMMA and the IMMA-inspired
multi-concept baselines, all driven by the one training loop (:func:`mima_lib.method.training.train`).

One step of MIMA (``method='mima'``), with theta the current UNet weights (:mod:`mima_lib.method.bilevel`):

    for every concept n:  theta'[n] = theta - alpha * grad_{S_l} L(x_l[n], c[n]; theta)    # simulated attack
    theta* = Merge(theta'[1..N])          # Custom Diffusion closed form on attn2 K/V, mean elsewhere
    loss   = -mean_n L(x_u[n], c[n]; theta*) + prior_weight * L(x_reg, c_reg; theta*)     # minimised by train()

``order=2`` (the paper) keeps theta'[n] and theta* functions of theta (``create_graph=True``), so the
gradient of ``loss`` is the exact hypergradient through the inner step and the merge. ``order=1`` (the
reference code) treats the merged weights as constants: the gradient at theta* is applied to theta.
``hypergrad='hvp'`` computes the same update concept by concept in memory flat in N (second order by
Hessian-vector products; :mod:`mima_lib.method.hypergrad`); ``'autograd'`` (default) is the double backward.
The paper sums the concept losses; we average them (``concept_reduction='sum'`` restores the sum), which
only rescales beta and keeps ``prior_weight`` meaning what it does in the reference code (-instance + prior).

Baselines: ``'imma'`` (one concept, no merge), ``'imma-sequential'`` (IMMA for concept 1 for ``steps``
steps, then concept 2, ...: ``steps * N`` steps in all), ``'imma-joint'`` (one simulated attack on the union
of all concepts' data, no merge, upper loss over all concepts).

Data are keyed by concept prompt, never by a class prompt, so concepts that share a class ("artwork") stay
apart. Only the S_u parameters change; :func:`save_immunized` writes just those.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from .bilevel import autograd_step, plain_attention
from .hypergrad import streamed_step
from .paramsets import apply_unet_params
from .problem import METHODS, ImmunizeConfig, Problem, prepare
from .tensor_io import load_tensors
from .training import TrainConfig, train

__all__ = ["ImmunizeConfig", "ImmunizeResult", "METHODS", "immunize", "bilevel_loss", "save_immunized",
           "load_immunized", "config_from_json", "diagnostics"]

FORMAT = "mima-immunized/1"


@dataclass
class ImmunizeResult:
    pipe: object
    config: ImmunizeConfig
    params: dict[str, Tensor]  # the changed (S_u) parameters, detached copies
    concepts: list[str]
    reg_prompts: list[str]
    losses: list[float] = field(default_factory=list)  # the minimised loss per step
    extras: list[dict] = field(default_factory=list)  # per step: 'target' (mean upper concept loss), 'prior'
    seconds_per_step: float = float("nan")
    resumed_from: int = 0
    # outer_rows='targets': per step, the largest relative change of the targets' K/V outputs over the layers
    # (before kv_budget scales it back); what untargeted prompts lose grows with it (method/selective.py)
    target_kv_change: list[float] = field(default_factory=list)


def bilevel_loss(prob: Problem, step: int, gen: torch.Generator, comm=None):
    """The loss train() minimises at ``step``, and extras for the progress bar: the autograd step
    (:func:`mima_lib.method.bilevel.autograd_step`), or with ``hypergrad='hvp'`` the streamed one, which has
    already written the gradient into the S_u parameters' ``.grad`` and returns a loss without a graph
    (``comm``: one rank of a concept-parallel run)."""
    if prob.cfg.hypergrad == "hvp":
        return streamed_step(prob, step, gen, comm)
    return autograd_step(prob, step, gen)


def immunize(pipe, concept_images: dict, reg_images=None, reg_prompt: str | None = None,
             cfg: ImmunizeConfig | None = None, checkpoint_dir=None, reg_captions: list[str] | None = None,
             progress: bool = True, on_step=None, comm=None) -> ImmunizeResult:
    """Immunize ``pipe.unet`` in place against the concepts of ``concept_images`` ({concept prompt: PIL
    images}). ``reg_images``: a list of images of ``reg_prompt`` or a dict {prompt: images} (prior term;
    not needed when ``prior_weight=0``). ``reg_captions``: captions for the merge's C_reg (default:
    :data:`mima_lib.method.captions.GENERIC_CAPTIONS`; leave out those that name a target,
    ``generic_captions(names)`` does). Resumes from ``checkpoint_dir`` when it holds a checkpoint.
    ``comm``: one rank of a concept-parallel run (see :mod:`mima_lib.method.distributed`; needs hypergrad='hvp')."""
    cfg = cfg or ImmunizeConfig()
    if comm is not None and cfg.hypergrad != "hvp":
        raise ValueError("a concept-parallel run needs hypergrad='hvp' (the streamed step)")
    prob = prepare(pipe, concept_images, reg_images, reg_prompt, cfg, reg_captions)
    unet = pipe.unet
    total = cfg.steps * (len(prob.prompts) if cfg.method == "imma-sequential" else 1)
    tcfg = TrainConfig(steps=total, lr=cfg.outer_lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
                       clip_grad=cfg.clip_grad, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
                       desc=f"{cfg.method} (order {cfg.order})")
    step_hook, kv_change = on_step, []
    if cfg.outer_rows == "targets":  # selective: project every K/V update onto the targets' own rows
        from .merge import is_cross_attention_kv
        from .selective import limit_change, project_update, target_row_projector
        from .text_tokens import encode_prompt_tokens

        kept = list(dict.fromkeys([p for p in prob.reg_prompts if p] + list(cfg.contrast_prompts)))
        P = target_row_projector(pipe, list(prob.prompts), kept,
                                 protect_prompts=list(cfg.protect_prompts), contrast=cfg.row_contrast,
                                 rtol=cfg.row_rtol)
        P = P.to(unet.device)
        if not float(torch.trace(P)) > 0.5:
            raise ValueError(f"no direction of the targets' text rows has row_contrast={cfg.row_contrast} times the "
                             "energy of the prior prompts' rows: lower row_contrast (0 keeps every owned row)")
        kv = {k: prob.params[k].detach().clone() for k in prob.outer_names if is_cross_attention_kv(k)}
        with torch.no_grad():
            target_rows = torch.cat(encode_prompt_tokens(pipe, list(prob.prompts), include_padding=True))
        target_rows = target_rows.to(unet.device)

        def step_hook(step):
            changes = []
            for k, w0 in kv.items():
                project_update(prob.params[k], w0, P)
                changes.append(limit_change(prob.params[k], w0, target_rows, cfg.kv_budget or float("inf")))
            kv_change.append(max(changes))  # before the budget's scaling
            if on_step is not None:
                on_step(step)
    saved_rg = {n: p.requires_grad for n, p in unet.named_parameters()}
    was_training = unet.training
    unet.eval().requires_grad_(False)
    for k in prob.outer_names:
        prob.params[k].requires_grad_(True)
    try:
        with plain_attention(unet, cfg.order == 2 and cfg.hypergrad == "autograd"):
            t0 = time.perf_counter()
            out = train(lambda step, gen: bilevel_loss(prob, step, gen, comm),
                        {k: prob.params[k] for k in prob.outer_names}, tcfg, checkpoint_dir=checkpoint_dir,
                        progress=progress, on_step=step_hook)
            elapsed = time.perf_counter() - t0
    finally:
        for n, p in unet.named_parameters():
            p.requires_grad_(saved_rg[n])
        unet.train(was_training)
    ran = total - out.resumed_from
    return ImmunizeResult(pipe, cfg, {k: prob.params[k].detach().clone() for k in prob.outer_names},
                          list(prob.prompts), list(prob.reg_prompts), out.losses, out.extras,
                          elapsed / ran if ran else float("nan"), out.resumed_from, kv_change)


def save_immunized(result: ImmunizeResult, folder, cfg: ImmunizeConfig | None = None) -> Path:
    """Write ``immunized.safetensors`` (only the changed S_u parameters) and ``immunize.json`` (settings)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = cfg or result.config
    save_file({k: v.detach().contiguous().cpu() for k, v in result.params.items()},
              str(folder / "immunized.safetensors"), metadata={"format": FORMAT})
    info = {"format": FORMAT, "config": asdict(cfg), "concepts": result.concepts,
            "reg_prompts": result.reg_prompts, "parameters": len(result.params),
            "numel": int(sum(v.numel() for v in result.params.values())),
            "steps_run": len(result.losses), "seconds_per_step": result.seconds_per_step,
            "target_kv_change": result.target_kv_change,
            "final_extras": result.extras[-1] if result.extras else {},
            "diagnostics": diagnostics(result.extras)}
    (folder / "immunize.json").write_text(json.dumps(info, indent=1))
    return folder


def diagnostics(extras: list[dict]) -> dict[str, float]:
    """Means over the run of what shows the method at work (steps where each was logged): the simulated
    attack's relative move, the merged model's, and the cosine / second-order share of the hypergradient."""
    keys = ("inner_move", "merged_move", "hypergrad_cos", "second_order_share")
    out = {}
    for k in keys:
        vals = [e[k] for e in extras if k in e]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def load_immunized(pipe, folder) -> dict:
    """Apply the parameters saved by :func:`save_immunized` to ``pipe.unet`` in place; returns the JSON."""
    folder = Path(folder)
    wfile, jfile = folder / "immunized.safetensors", folder / "immunize.json"
    if not wfile.exists():
        raise FileNotFoundError(f"{folder} has no immunized.safetensors: not a folder written by save_immunized")
    info = json.loads(jfile.read_text()) if jfile.exists() else {}
    apply_unet_params(pipe.unet, load_tensors(wfile))  # checks names and shapes against this UNet
    return info


def config_from_json(info: dict) -> ImmunizeConfig:
    return replace(ImmunizeConfig(), **info.get("config", {}))
