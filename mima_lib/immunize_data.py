"""Immunization inputs, checked and prepared once: latents per concept, text states, the merge's token rows
(C[n] per concept, C_reg of the regularization captions), prior-preservation data and the parameter sets.
Everything here fails early with a message that names the fix."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import toyworld
from .diffusion import encode_images, encode_prompts
from .merge import is_cross_attention_kv, unique_rows
from .paramsets import select_params
from .text_tokens import encode_prompt_tokens

__all__ = ["Problem", "prepare", "default_reg_captions", "training_scheduler", "normalize_images"]


@dataclass
class Problem:
    unet: object
    sched: object
    cfg: object  # ImmunizeConfig
    prompts: list[str]  # one per concept, the key of its data
    latents: list[Tensor]  # per concept (n_i, C, h, w)
    states: Tensor  # (N, T, D): the UNet conditioning of each concept prompt
    token_rows: list[Tensor]  # per concept: its prompt's hidden-state rows BOS..EOS (the merge's C[n])
    reg_rows: Tensor  # C_reg: rows of the regularization captions
    reg_prompts: list[str]
    prior_latents: list[Tensor]  # per regularization prompt
    prior_states: Tensor | None  # (P, T, D)
    params: dict[str, Tensor]  # name -> the UNet's parameter
    inner_names: list[str]  # S_l
    outer_names: list[str]  # S_u
    outer_set: frozenset


def training_scheduler(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def default_reg_captions(n: int = 200, seed: int = 0, words: list[str] | None = None) -> list[str]:
    """``n`` fixed-by-seed captions of 1-8 words drawn from the toy world's vocabulary (plain English words,
    so SD's tokenizer reads them too). For SD pass real captions instead (Custom Diffusion used LAION's)."""
    words = list(words or toyworld.vocabulary())
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 9)))) for _ in range(n)]


def _image_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def normalize_images(images, what: str, size: int) -> list:
    if images is None or len(images) == 0:
        raise ValueError(f"{what} has no images; give at least one (the paper uses 20 per concept)")
    if isinstance(images, torch.Tensor):
        got = {tuple(images.shape[-2:])}
    else:
        got = {tuple(im.size) for im in images}
    if got != {(size, size)}:
        raise ValueError(f"{what}: images are {sorted(got)} but the model makes {size}x{size} images; resize them")
    return images


def _encode(pipe, images, hflip: bool) -> Tensor:
    z = torch.cat([encode_images(pipe.vae, images[i:i + 64]) for i in range(0, len(images), 64)])
    return torch.cat([z, z.flip(-1)]) if hflip else z


def prepare(pipe, concept_images: dict, reg_images, reg_prompt, cfg, reg_captions=None) -> Problem:
    """Check the settings and the data, then encode everything the bi-level step needs."""
    cfg.validate()
    if not isinstance(concept_images, dict):
        raise TypeError("concept_images must be a dict {concept prompt: list of images}, keyed by concept")
    if not concept_images:
        raise ValueError("no concepts to immunize against: concept_images is empty")
    prompts = list(concept_images)
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("every concept key must be a non-empty prompt string, e.g. 'an artwork of van gogh'")
    if cfg.method == "imma" and len(prompts) > 1:
        raise ValueError(f"method 'imma' immunizes one concept, got {len(prompts)}; use 'mima', "
                         "'imma-sequential' or 'imma-joint' for several")
    size = _image_size(pipe)
    for p in prompts:
        normalize_images(concept_images[p], f"concept {p!r}", size)
    if isinstance(reg_images, dict):
        reg = dict(reg_images)
    elif reg_images is not None and len(reg_images) > 0:
        if not reg_prompt:
            raise ValueError("reg_images given without reg_prompt (e.g. 'artwork' or 'a photo of an object')")
        reg = {reg_prompt: reg_images}
    else:
        reg = {}
    if cfg.prior_weight > 0 and not reg:
        raise ValueError("prior_weight > 0 needs regularization images (reg_images and reg_prompt); "
                         "pass them or set prior_weight=0")
    for p, ims in reg.items():
        normalize_images(ims, f"regularization prompt {p!r}", size)
    unet = pipe.unet
    inner = select_params(unet, cfg.inner_params, "inner")
    outer = select_params(unet, cfg.outer_params, "outer")
    dev, dt = unet.device, unet.dtype
    with torch.no_grad():
        latents = [_encode(pipe, concept_images[p], cfg.hflip).to(dev, dt) for p in prompts]
        states = encode_prompts(pipe, prompts).to(dev, dt)
        token_rows = [t.to(dev, dt) for t in encode_prompt_tokens(pipe, prompts)]
        caps = list(reg_captions) if reg_captions is not None else default_reg_captions()
        reg_rows = torch.cat(encode_prompt_tokens(pipe, caps)).to(dev, dt) if caps else token_rows[0][:0]
        use_reg = reg and cfg.prior_weight > 0
        reg_prompts = list(reg) if use_reg else []
        prior_latents = [_encode(pipe, ims, cfg.hflip).to(dev, dt) for ims in reg.values()] if use_reg else []
        if use_reg and cfg.prior_unconditional and "" not in reg:  # one more group: "" on every prior image
            reg_prompts.append("")
            prior_latents.append(torch.cat(prior_latents))
        prior_states = encode_prompts(pipe, reg_prompts).to(dev, dt) if use_reg else None
    if cfg.method == "mima" and any(is_cross_attention_kv(k) for k in inner):
        r = len(unique_rows(torch.cat(token_rows)))
        d_in = token_rows[0].shape[1]
        if r > d_in:
            raise ValueError(f"the merge needs at most {d_in} distinct target token rows, the {len(prompts)} "
                             f"concept prompts give {r}: immunize fewer concepts at once or use shorter prompts")
    params = dict(unet.named_parameters())
    return Problem(unet, training_scheduler(pipe), cfg, prompts, latents, states, token_rows, reg_rows,
                   reg_prompts, prior_latents, prior_states, params, inner, outer,
                   frozenset(outer))
