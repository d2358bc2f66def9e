"""Measuring immunization cheaply, on fixed noise: the plain diffusion loss of each concept, and the loss of
the *merged simulated-attack model* (one attacker step per concept from the current weights, then the
Custom Diffusion merge) that MIMA's upper level ascends. Before/after comparisons use the same images,
noise and timesteps (every draw comes from a generator reseeded from ``seed``)."""
from __future__ import annotations

from dataclasses import replace

import torch

from .immunize import ImmunizeConfig, _loss, inner_step, merged_params
from .immunize_data import prepare

__all__ = ["concept_losses", "attack_losses"]


def _fixed_noise_loss(prob, params, n: int, seed: int, n_noise: int) -> float:
    lat = prob.latents[n].repeat(n_noise, 1, 1, 1)
    st = prob.states[n:n + 1].expand(len(lat), -1, -1)
    gen = torch.Generator("cpu").manual_seed(seed + 1000 + n)
    with torch.no_grad():
        return float(_loss(prob, params, lat, st, gen))


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
        adapted.append({k: v.detach() for k, v in inner_step(prob, theta, lat, st, gen, False).items()})
    with torch.no_grad():
        theta_star = merged_params(prob, {k: v.detach() for k, v in theta.items()}, adapted,
                                   list(range(len(prob.prompts))))
    out["merged"] = {p: _fixed_noise_loss(prob, theta_star, n, seed, n_noise) for n, p in enumerate(prob.prompts)}
    return out


def concept_losses(pipe, concept_images: dict, seed: int = 0, n_noise: int = 4) -> dict[str, float]:
    """Plain loss of each concept on fixed noise (no attack)."""
    return attack_losses(pipe, concept_images, ImmunizeConfig.toy(inner_params="xattn-kv"), seed=seed,
                         n_noise=n_noise, merged=False)["plain"]
