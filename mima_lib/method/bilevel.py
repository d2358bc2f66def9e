"""The pieces of one MIMA step, as functions of the current weights theta (``Problem.params``):

    for every concept n:  theta'[n] = theta - alpha * grad_{S_l} L(x_l[n], c[n]; theta)    # inner_step
    theta* = Merge(theta'[1..N])          # merged_params: Custom Diffusion on attn2 K/V, mean elsewhere
    loss   = -mean_n L(x_u[n], c[n]; theta*) + prior_weight * L(x_reg, c_reg; theta*)     # upper_loss

:func:`autograd_step` chains them in one graph (``order=2``: ``create_graph=True``, so the backward is the
exact hypergradient through the inner step and the merge; ``order=1``: the merged weights are constants).
:mod:`mima_lib.method.hypergrad` streams the same step concept by concept.

:func:`attack_losses` measures the objective cheaply on fixed noise: the plain diffusion loss of each
concept and the loss of the merged simulated-attack model, before/after comparisons on the same draws.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor
from torch.func import functional_call

from .diffusion import noise_prediction_loss
from .merge import is_cross_attention_kv, merge_cross_attention
from .paramsets import inner_step_size, lora_A, lora_delta
from .problem import ImmunizeConfig, Problem, prepare

__all__ = ["plain_attention", "functional_unet", "concept_loss", "live_params", "inner_step", "merged_params",
           "upper_loss", "sample_rows", "active_concepts", "autograd_step", "attack_losses", "concept_losses"]


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


def functional_unet(unet, params: dict[str, Tensor]):
    """The UNet evaluated at ``params`` (a name -> tensor dict overriding its own parameters)."""
    return lambda *a, **k: functional_call(unet, params, a, k)


def concept_loss(prob: Problem, params, latents, states, gen, reduction="mean"):
    """The diffusion loss of the UNet at ``params`` on these latents and text states (draws from ``gen``)."""
    return noise_prediction_loss(functional_unet(prob.unet, params), prob.sched, latents, states, generator=gen,
                                 reduction=reduction)


def live_params(prob: Problem) -> dict[str, Tensor]:
    """theta for one step: the S_u parameters themselves (gradients reach them), detached leaves for the
    S_l parameters outside S_u (adapted by the attacker, never updated)."""
    theta = {}
    for k in prob.inner_names + prob.outer_names:
        p = prob.params[k]
        theta[k] = p if k in prob.outer_set else p.detach().requires_grad_(True)
    return theta


def step_size(prob: Problem, unit: int, key: str, grad: Tensor):
    """The attacker's step size on tensor ``key`` for simulated attack ``unit`` of this step
    (paramsets.inner_step_size; held constant in the hypergradient; see Problem.step_sizes)."""
    held = prob.step_sizes
    if held is not None and (unit, key) in held:
        return held[(unit, key)]
    size = inner_step_size(grad, prob.cfg.inner_lr, prob.cfg.inner_scaling)
    if held is not None:
        held[(unit, key)] = size
    return size


def inner_step(prob: Problem, theta, latents: Tensor, states: Tensor, gen, create_graph: bool,
               unit: int = 0) -> dict:
    """One simulated adaptation step on S_l: theta' = theta - alpha_k * grad, alpha_k the attacker's step size
    on tensor k (SGD, or Adam's first step: :func:`step_size`), or one such step of a fresh LoRA."""
    cfg = prob.cfg
    names = prob.inner_names
    loss = concept_loss(prob, theta, latents, states, gen)
    grads = torch.autograd.grad(loss, [theta[k] for k in names], create_graph=create_graph, allow_unused=True)
    out = {}
    for k, g in zip(names, grads):
        if g is None:
            out[k] = theta[k]
        elif cfg.inner_params == "lora":  # Adam scales B's gradient G A^T; A is drawn once, as in one LoRA step
            state = gen.get_state()
            size = step_size(prob, unit, k, g @ lora_A(g, cfg.lora_rank, gen).T)
            gen.set_state(state)
            out[k] = theta[k] + lora_delta(g, size, cfg.lora_rank, gen)
        else:
            out[k] = theta[k] - step_size(prob, unit, k, g) * g
    return out


def relative_move(theta: dict, moved: dict, names: list[str]) -> float:
    """||moved - theta|| / ||theta|| over ``names``: how far the simulated attack takes the weights."""
    with torch.no_grad():
        num = sum(float((moved[k] - theta[k]).double().pow(2).sum()) for k in names)
        den = sum(float(theta[k].double().pow(2).sum()) for k in names)
    return (num / den) ** 0.5 if den > 0 else float("nan")


def hypergradient_agreement(first: list[Tensor], full: list[Tensor]) -> dict[str, float]:
    """How much the second-order term matters: cosine(order-1 gradient, exact gradient) and
    ||exact - order-1|| / ||exact||, the share of the hypergradient the second-order term contributes."""
    a = torch.cat([g.detach().double().flatten() for g in first])
    b = torch.cat([g.detach().double().flatten() for g in full])
    nb = float(b.norm())
    if nb == 0:
        return {"hypergrad_cos": float("nan"), "second_order_share": float("nan")}
    return {"hypergrad_cos": float(a @ b) / (float(a.norm()) * nb + 1e-300),
            "second_order_share": float((b - a).norm()) / nb}


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
    per = concept_loss(prob, theta_star, torch.cat(lat), torch.cat(st), gen, reduction="none")
    sizes = [len(x) for x in x_u]
    concept_losses = torch.stack([c.mean() for c in per[:sum(sizes)].split(sizes)])
    prior = None
    if together:
        prior = per[sum(sizes):].mean()
    elif use_prior:
        prior = concept_loss(prob, theta, torch.cat(p_lat), torch.cat(p_st), gen)
    return concept_losses, prior


def sample_rows(latents: Tensor, bs: int, gen) -> Tensor:
    """``bs`` rows of ``latents`` drawn with replacement."""
    return latents[torch.randint(0, len(latents), (bs,), generator=gen)]


def active_concepts(prob: Problem, step: int) -> list[int]:
    if prob.cfg.method == "imma-sequential":
        return [min(step // max(1, prob.cfg.steps), len(prob.prompts) - 1)]
    return list(range(len(prob.prompts)))


def autograd_step(prob: Problem, step: int, gen: torch.Generator):
    """The loss train() minimises at ``step`` (minus the merged-model concept loss plus the prior term), as
    one graph: its backward is the exact hypergradient (order 2) or the first-order one. Also returns extras
    for the progress bar. All randomness comes from ``gen``."""
    cfg = prob.cfg
    second = cfg.order == 2
    theta = live_params(prob)
    concepts = active_concepts(prob, step)
    bs = cfg.batch_size
    x_u = [sample_rows(prob.latents[n], bs, gen) for n in concepts]
    if cfg.method == "imma-joint":
        x_l = torch.cat([sample_rows(prob.latents[n], bs, gen) for n in concepts])
        s_l = torch.cat([prob.states[n:n + 1].expand(bs, -1, -1) for n in concepts])
        adapted = [inner_step(prob, theta, x_l, s_l, gen, second)]
    else:
        adapted = [inner_step(prob, theta, sample_rows(prob.latents[n], bs, gen),
                              prob.states[n:n + 1].expand(bs, -1, -1), gen, second, unit=i)
                   for i, n in enumerate(concepts)]
    if cfg.method == "mima":
        theta_star = merged_params(prob, theta, adapted, concepts)
    else:
        theta_star = {**theta, **adapted[0]}
    if not second:  # first order: the merged weights are constants, the upper gradient at theta* hits theta
        theta_star = {k: theta[k] + (v - theta[k]).detach() if k in prob.outer_set else v.detach()
                      for k, v in theta_star.items()}
    diagnose = second and cfg.diagnose_every and step % cfg.diagnose_every == 0
    if diagnose:  # a node of its own where theta* is theta itself, so the gradient at theta* can be read apart
        theta_star = {k: v.view_as(v) if v is theta[k] else v for k, v in theta_star.items()}
    losses, prior = upper_loss(prob, theta_star, theta, x_u, concepts, gen)
    target = losses.mean() if cfg.concept_reduction == "mean" else losses.sum()
    loss = -target
    extras = {"target": losses.detach().mean(),
              "inner_move": sum(relative_move(theta, a, prob.inner_names) for a in adapted) / len(adapted),
              "merged_move": relative_move(theta, theta_star, prob.inner_names)}
    if prior is not None:
        loss = loss + cfg.prior_weight * prior
        extras["prior"] = prior.detach()
    if diagnose:
        return loss.detach(), {**extras, **_fill_exact_gradient(prob, loss, prior, theta, theta_star)}
    return loss, extras


def _fill_exact_gradient(prob: Problem, loss, prior, theta, theta_star) -> dict[str, float]:
    """Write the exact hypergradient into the S_u parameters' .grad, and compare it with the first-order one:
    dloss/dtheta* with the merged weights held fixed, plus (prior_on='immunized') the prior's gradient at
    theta, which reaches theta directly and is first order by definition."""
    U = prob.outer_names
    keep = dict(retain_graph=True, allow_unused=True)
    first = [torch.zeros_like(theta[k]) if g is None else g
             for k, g in zip(U, torch.autograd.grad(loss, [theta_star[k] for k in U], **keep))]
    if prior is not None and prob.cfg.prior_on == "immunized":
        direct = torch.autograd.grad(prob.cfg.prior_weight * prior, [theta[k] for k in U], **keep)
        first = [f if d is None else f + d for f, d in zip(first, direct)]
    full = torch.autograd.grad(loss, [theta[k] for k in U])
    for k, g in zip(U, full):
        prob.params[k].grad = g
    return hypergradient_agreement(first, full)


# ------------------------------------------------------------------------ measuring on fixed noise
def _fixed_noise_loss(prob, params, n: int, seed: int, n_noise: int) -> float:
    lat = prob.latents[n].repeat(n_noise, 1, 1, 1)
    st = prob.states[n:n + 1].expand(len(lat), -1, -1)
    gen = torch.Generator("cpu").manual_seed(seed + 1000 + n)
    with torch.no_grad():
        return float(concept_loss(prob, params, lat, st, gen))


def attack_losses(pipe, concept_images: dict, cfg: ImmunizeConfig | None = None, reg_captions=None,
                  seed: int = 0, n_noise: int = 4, attack_batch: int = 8, merged: bool = True) -> dict:
    """{'plain': {prompt: loss}, 'merged': {prompt: loss}} on fixed noise (``n_noise`` draws per image).

    The attack: from the current weights, one SGD step of ``cfg.inner_lr`` on ``cfg.inner_params`` per
    concept on its first ``attack_batch`` images, then Merge (as in MIMA's lower level) over all concepts
    of ``concept_images``. ``merged=False`` only computes the plain losses (e.g. for held-out concepts).
    """
    cfg = replace(cfg or ImmunizeConfig.toy(), method="mima", prior_weight=0.0, hflip=False)
    prob = prepare(pipe, concept_images, None, None, cfg, reg_captions)
    out = {"plain": {p: _fixed_noise_loss(prob, {}, n, seed, n_noise) for n, p in enumerate(prob.prompts)}}
    if not merged:
        return out
    theta = {k: prob.params[k].detach().requires_grad_(True) for k in prob.inner_names + prob.outer_names}
    gen = torch.Generator("cpu").manual_seed(seed)
    adapted = []
    for n in range(len(prob.prompts)):
        lat = prob.latents[n][:attack_batch]
        st = prob.states[n:n + 1].expand(len(lat), -1, -1)
        adapted.append({k: v.detach() for k, v in inner_step(prob, theta, lat, st, gen, False, unit=n).items()})
    with torch.no_grad():
        theta_star = merged_params(prob, {k: v.detach() for k, v in theta.items()}, adapted,
                                   list(range(len(prob.prompts))))
    out["merged"] = {p: _fixed_noise_loss(prob, theta_star, n, seed, n_noise) for n, p in enumerate(prob.prompts)}
    return out


def concept_losses(pipe, concept_images: dict, seed: int = 0, n_noise: int = 4) -> dict[str, float]:
    """Plain loss of each concept on fixed noise (no attack)."""
    return attack_losses(pipe, concept_images, ImmunizeConfig.toy(inner_params="xattn-kv"), seed=seed,
                         n_noise=n_noise, merged=False)["plain"]
