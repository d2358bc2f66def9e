"""Model immunization: MIMA (Algorithm 1, bi-level with differentiable merge), IMMA and the IMMA-inspired
multi-concept baselines, all driven by the one training loop (:func:`mima_lib.training.train`).

One step of MIMA (``method='mima'``), with theta the current UNet weights:

    for every concept n:  theta'[n] = theta - alpha * grad_{S_l} L(x_l[n], c[n]; theta)    # simulated attack
    theta* = Merge(theta'[1..N])          # Custom Diffusion closed form on attn2 K/V, mean elsewhere
    loss   = -mean_n L(x_u[n], c[n]; theta*) + prior_weight * L(x_reg, c_reg; theta*)     # minimised by train()

``order=2`` (the paper) keeps theta'[n] and theta* functions of theta (``create_graph=True``), so the
gradient of ``loss`` is the exact hypergradient through the inner step and the merge. ``order=1`` (the
reference code) treats the merged weights as constants: the gradient at theta* is applied to theta.
``hypergrad='hvp'`` computes the same update concept by concept in memory flat in N (second order by
Hessian-vector products; :mod:`mima_lib.hypergrad`); ``'autograd'`` (default) is the double backward above.
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor
from torch.func import functional_call

from .diffusion import noise_prediction_loss
from .immunize_data import Problem, prepare, training_scheduler  # noqa: F401 (re-exported)
from .merge import is_cross_attention_kv, merge_cross_attention
from .paramsets import lora_delta
from .training import TrainConfig, train

__all__ = ["ImmunizeConfig", "ImmunizeResult", "METHODS", "immunize", "prepare", "inner_step", "merged_params",
           "upper_loss", "bilevel_loss", "live_params", "plain_attention", "save_immunized", "load_immunized"]

METHODS = ("mima", "imma", "imma-sequential", "imma-joint")
FORMAT = "mima-immunized/1"


@dataclass
class ImmunizeConfig:
    """Plain-data settings of one immunization run. Defaults are the paper's SD v1-4 ones; see
    :meth:`toy` for the values measured on the embedded toy model."""

    method: str = "mima"  # 'mima' | 'imma' | 'imma-sequential' | 'imma-joint'
    order: int = 2  # 2: exact hypergradient (the paper); 1: merged weights as constants (reference code)
    steps: int = 500  # outer steps (imma-sequential: per concept)
    inner_lr: float = 1e-5  # alpha, SGD step of the simulated attacker (for 'lora': the adapter's lr)
    outer_lr: float = 3e-5  # beta (3e-5 re-learning, 2e-5 personalization in the reference code)
    inner_params: str = "unet"  # S_l: 'xattn-kv' | 'xattn' | 'unet' | 'lora'
    outer_params: str = "xattn"  # S_u: 'xattn' | 'xattn-kv' | 'attn'
    prior_weight: float = 1.0  # 0 disables the prior-preservation term
    prior_on: str = "merged"  # 'merged' (reference: same forward as the instance loss) | 'immunized' (theta)
    # also preserve the empty prompt on all regularization images: classifier-free guidance's unconditional
    # branch. Needed when UCE mapped the targets onto "" (its default guide): ascending a target's loss
    # then moves the unconditional prediction, and every guided generation breaks (measured on the toy)
    prior_unconditional: bool = False
    concept_reduction: str = "mean"  # 'mean' | 'sum' of the concepts' upper losses
    batch_size: int = 1  # images per concept (and per regularization prompt) in each batch
    hflip: bool = False  # add mirrored copies of every image (the reference code flips at random)
    lora_rank: int = 4  # only for inner_params='lora'
    merge_ridge: float = 1e-6  # ridge on C_reg^T C_reg in the merge (relative to its mean diagonal)
    merge_float64: bool = True  # solve the merge in float64 (small matrices; stable with many concepts)
    optimizer: str = "adamw"  # 'adamw' | 'sgd' for the upper level
    weight_decay: float = 0.0
    clip_grad: float | None = 1.0
    checkpoint_every: int = 0  # 0: no checkpoints
    seed: int = 42  # the reference code's seed
    # 'autograd': double backward through every inner step (memory grows with N); 'hvp': concept by concept,
    # memory flat in N, second order by Hessian-vector products (mima_lib.hypergrad; order 1: streamed)
    hypergrad: str = "autograd"
    hvp_scheme: str = "central"  # 'central' | 'forward' finite differences of gradients | 'jvp' (exact)
    hvp_eps: float | None = None  # relative finite-difference step; None: by precision (hypergrad.default_hvp_eps)
    concept_chunk: int = 1  # 'hvp': concepts per upper-level forward pass (more: faster, more memory)

    @classmethod
    def toy(cls, **overrides) -> "ImmunizeConfig":
        """Settings measured on the embedded toy model (tests/test_immunize.py, scripts/demo_immunize.py).

        inner_lr=1.0: on the trained toy UNet one SGD step on attn2 lowers a concept's loss by ~1%; larger
        steps overshoot. outer_lr=1e-3 (AdamW): 15 steps raise the targets' merged-attack loss by ~20-40%.
        prior_weight=3 on the immunized weights: with the reference's (1.0, on theta*) the loss of
        untargeted concepts rose as much as the targets' (the noise-prediction loss is mostly
        prompt-independent, so ascent first finds generic damage; the prior must outweigh it)."""
        base = dict(steps=30, inner_lr=1.0, outer_lr=1e-3, inner_params="xattn", batch_size=2, prior_weight=3.0,
                    prior_on="immunized")
        return cls(**{**base, **overrides})

    def validate(self) -> None:
        from .paramsets import check_set

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.order not in (1, 2):
            raise ValueError(f"order must be 1 (first-order, reference code) or 2 (exact hypergradient), "
                             f"got {self.order!r}")
        check_set(self.inner_params, "inner")
        check_set(self.outer_params, "outer")
        for name in ("inner_lr", "outer_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.steps < 0 or self.batch_size < 1 or self.lora_rank < 1 or self.prior_weight < 0:
            raise ValueError("need steps >= 0, batch_size >= 1, lora_rank >= 1 and prior_weight >= 0")
        if self.prior_on not in ("merged", "immunized"):
            raise ValueError(f"prior_on must be 'merged' or 'immunized', got {self.prior_on!r}")
        if self.concept_reduction not in ("mean", "sum"):
            raise ValueError(f"concept_reduction must be 'mean' or 'sum', got {self.concept_reduction!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use 'adamw' or 'sgd'")
        from .hypergrad import SCHEMES

        if self.hypergrad not in ("autograd", "hvp"):
            raise ValueError(f"hypergrad must be 'autograd' or 'hvp', got {self.hypergrad!r}")
        if self.hvp_scheme not in SCHEMES:
            raise ValueError(f"unknown hvp_scheme {self.hvp_scheme!r}; choose one of {', '.join(SCHEMES)}")
        if (self.hvp_eps is not None and not self.hvp_eps > 0) or self.concept_chunk < 1:
            raise ValueError(f"need hvp_eps > 0 or None, concept_chunk >= 1: {self.hvp_eps!r}, {self.concept_chunk!r}")


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


# ---------------------------------------------------------------------------------------------- pieces
@contextmanager
def plain_attention(unet, enabled: bool = True):
    """Temporarily use diffusers' plain AttnProcessor: fused SDPA has no double backward."""
    if not enabled:
        yield
        return
    from diffusers.models.attention_processor import AttnProcessor

    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


def _model(unet, params: dict[str, Tensor]):
    return lambda *a, **k: functional_call(unet, params, a, k)


def _loss(prob: Problem, params, latents, states, gen, reduction="mean"):
    return noise_prediction_loss(_model(prob.unet, params), prob.sched, latents, states, generator=gen,
                                 reduction=reduction)


def live_params(prob: Problem) -> dict[str, Tensor]:
    """theta for one step: the S_u parameters themselves (gradients reach them), detached leaves for the
    S_l parameters outside S_u (adapted by the attacker, never updated)."""
    theta = {}
    for k in prob.inner_names + prob.outer_names:
        p = prob.params[k]
        theta[k] = p if k in prob.outer_set else p.detach().requires_grad_(True)
    return theta


def inner_step(prob: Problem, theta, latents: Tensor, states: Tensor, gen, create_graph: bool) -> dict:
    """One simulated adaptation step on S_l: theta' = theta - alpha * grad (or one LoRA step)."""
    cfg = prob.cfg
    names = prob.inner_names
    loss = _loss(prob, theta, latents, states, gen)
    grads = torch.autograd.grad(loss, [theta[k] for k in names], create_graph=create_graph, allow_unused=True)
    out = {}
    for k, g in zip(names, grads):
        if g is None:
            out[k] = theta[k]
        elif cfg.inner_params == "lora":
            out[k] = theta[k] + lora_delta(g, cfg.inner_lr, cfg.lora_rank, gen)
        else:
            out[k] = theta[k] - cfg.inner_lr * g
    return out


def merged_params(prob: Problem, theta, adapted: list[dict], concepts: list[int]) -> dict[str, Tensor]:
    """theta* = Merge(theta'[n]): Custom Diffusion's closed form on attn2 K/V (targets: each concept's token
    rows, regularizer: the caption rows), the mean of the adapted copies for the other S_l parameters."""
    out = dict(theta)
    kv = [k for k in prob.inner_names if is_cross_attention_kv(k)]
    rest = [k for k in prob.inner_names if not is_cross_attention_kv(k)]
    if kv:
        out.update(merge_cross_attention(
            {k: theta[k] for k in kv}, [{k: a[k] for k in kv} for a in adapted],
            [prob.token_rows[n] for n in concepts], prob.reg_rows, ridge=prob.cfg.merge_ridge,
            dtype=torch.float64 if prob.cfg.merge_float64 else None))
    for k in rest:
        out[k] = torch.stack([a[k] for a in adapted]).mean(0)
    return out


def upper_loss(prob: Problem, theta_star, theta, x_u: list[Tensor], concepts: list[int], gen):
    """Per-concept losses of the merged model on the upper batches (N,), and the prior loss (or None).
    With prior_on='merged' everything is one forward pass, as in the reference code."""
    bs = prob.cfg.batch_size
    lat = list(x_u)
    st = [prob.states[n:n + 1].expand(len(x), -1, -1) for n, x in zip(concepts, x_u)]
    use_prior = prob.cfg.prior_weight > 0 and prob.prior_latents
    p_lat, p_st = [], []
    if use_prior:
        for j, pl in enumerate(prob.prior_latents):
            p_lat.append(pl[torch.randint(0, len(pl), (bs,), generator=gen)])
            p_st.append(prob.prior_states[j:j + 1].expand(bs, -1, -1))
    together = use_prior and prob.cfg.prior_on == "merged"
    if together:
        lat, st = lat + p_lat, st + p_st
    per = _loss(prob, theta_star, torch.cat(lat), torch.cat(st), gen, reduction="none")
    sizes = [len(x) for x in x_u]
    concept_losses = torch.stack([c.mean() for c in per[:sum(sizes)].split(sizes)])
    prior = None
    if together:
        prior = per[sum(sizes):].mean()
    elif use_prior:
        prior = _loss(prob, theta, torch.cat(p_lat), torch.cat(p_st), gen)
    return concept_losses, prior


def _sample(latents: Tensor, bs: int, gen) -> Tensor:
    return latents[torch.randint(0, len(latents), (bs,), generator=gen)]


def active_concepts(prob: Problem, step: int) -> list[int]:
    if prob.cfg.method == "imma-sequential":
        return [min(step // max(1, prob.cfg.steps), len(prob.prompts) - 1)]
    return list(range(len(prob.prompts)))


def bilevel_loss(prob: Problem, step: int, gen: torch.Generator, comm=None):
    """The loss train() minimises at ``step`` (minus the merged-model concept loss plus the prior term),
    and extras for the progress bar. All randomness comes from ``gen``. With ``hypergrad='hvp'`` the
    gradient is already in the S_u parameters' ``.grad`` and the loss has no graph (mima_lib.hypergrad;
    ``comm``: one rank of a concept-parallel run)."""
    cfg = prob.cfg
    if cfg.hypergrad == "hvp":
        from .hypergrad import streamed_step

        return streamed_step(prob, step, gen, comm)
    second = cfg.order == 2
    theta = live_params(prob)
    concepts = active_concepts(prob, step)
    bs = cfg.batch_size
    x_u = [_sample(prob.latents[n], bs, gen) for n in concepts]
    if cfg.method == "imma-joint":
        x_l = torch.cat([_sample(prob.latents[n], bs, gen) for n in concepts])
        s_l = torch.cat([prob.states[n:n + 1].expand(bs, -1, -1) for n in concepts])
        adapted = [inner_step(prob, theta, x_l, s_l, gen, second)]
    else:
        adapted = [inner_step(prob, theta, _sample(prob.latents[n], bs, gen),
                              prob.states[n:n + 1].expand(bs, -1, -1), gen, second) for n in concepts]
    if cfg.method == "mima":
        theta_star = merged_params(prob, theta, adapted, concepts)
    else:
        theta_star = {**theta, **adapted[0]}
    if not second:  # first order: the merged weights are constants, the upper gradient at theta* hits theta
        theta_star = {k: theta[k] + (v - theta[k]).detach() if k in prob.outer_set else v.detach()
                      for k, v in theta_star.items()}
    losses, prior = upper_loss(prob, theta_star, theta, x_u, concepts, gen)
    target = losses.mean() if cfg.concept_reduction == "mean" else losses.sum()
    loss = -target
    extras = {"target": losses.detach().mean()}
    if prior is not None:
        loss = loss + cfg.prior_weight * prior
        extras["prior"] = prior.detach()
    return loss, extras


# ---------------------------------------------------------------------------------------------- entry
def immunize(pipe, concept_images: dict, reg_images=None, reg_prompt: str | None = None,
             cfg: ImmunizeConfig | None = None, checkpoint_dir=None, reg_captions: list[str] | None = None,
             progress: bool = True, on_step=None, comm=None) -> ImmunizeResult:
    """Immunize ``pipe.unet`` in place against the concepts of ``concept_images`` ({concept prompt: PIL
    images}). ``reg_images``: a list of images of ``reg_prompt`` or a dict {prompt: images} (prior term;
    not needed when ``prior_weight=0``). ``reg_captions``: captions for the merge's C_reg (default: ~200
    fixed-by-seed captions of toy-world words). Resumes from ``checkpoint_dir`` when it holds a checkpoint.
    ``comm``: one rank of a concept-parallel run (see :mod:`mima_lib.distributed`; needs hypergrad='hvp')."""
    cfg = cfg or ImmunizeConfig()
    if comm is not None and cfg.hypergrad != "hvp":
        raise ValueError("a concept-parallel run needs hypergrad='hvp' (the streamed step)")
    prob = prepare(pipe, concept_images, reg_images, reg_prompt, cfg, reg_captions)
    unet = pipe.unet
    total = cfg.steps * (len(prob.prompts) if cfg.method == "imma-sequential" else 1)
    tcfg = TrainConfig(steps=total, lr=cfg.outer_lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
                       clip_grad=cfg.clip_grad, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
                       desc=f"{cfg.method} (order {cfg.order})")
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
                        progress=progress, on_step=on_step)
            elapsed = time.perf_counter() - t0
    finally:
        for n, p in unet.named_parameters():
            p.requires_grad_(saved_rg[n])
        unet.train(was_training)
    ran = total - out.resumed_from
    return ImmunizeResult(pipe, cfg, {k: prob.params[k].detach().clone() for k in prob.outer_names},
                          list(prob.prompts), list(prob.reg_prompts), out.losses, out.extras,
                          elapsed / ran if ran else float("nan"), out.resumed_from)


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
            "final_extras": result.extras[-1] if result.extras else {}}
    (folder / "immunize.json").write_text(json.dumps(info, indent=1))
    return folder


def load_immunized(pipe, folder) -> dict:
    """Apply the parameters saved by :func:`save_immunized` to ``pipe.unet`` in place; returns the JSON."""
    from .artifacts import apply_unet_params, load_tensors

    folder = Path(folder)
    wfile, jfile = folder / "immunized.safetensors", folder / "immunize.json"
    if not wfile.exists():
        raise FileNotFoundError(f"{folder} has no immunized.safetensors: not a folder written by save_immunized")
    info = json.loads(jfile.read_text()) if jfile.exists() else {}
    apply_unet_params(pipe.unet, load_tensors(wfile))  # checks names and shapes against this UNet
    return info


def config_from_json(info: dict) -> ImmunizeConfig:
    return replace(ImmunizeConfig(), **info.get("config", {}))
