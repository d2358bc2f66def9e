"""What one immunization run is: its settings (:class:`ImmunizeConfig`) and its inputs, checked and prepared
once (:class:`Problem`): latents per concept, text states, the merge's token rows (C[n] per concept, C_reg of
the regularization captions), prior-preservation data and the parameter sets S_l / S_u.
Everything here fails early with a message that names the fix."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .captions import GENERIC_CAPTIONS
from .diffusion import encode_images, encode_prompts, training_scheduler
from .merge import is_cross_attention_kv, unique_rows
from .paramsets import check_set, select_params
from .text_tokens import encode_prompt_tokens

__all__ = ["METHODS", "SCHEMES", "ImmunizeConfig", "Problem", "prepare", "normalize_images"]

METHODS = ("mima", "imma", "imma-sequential", "imma-joint")
SCHEMES = ("central", "forward", "jvp")  # Hessian-vector products of the streamed step (mima_lib.method.hypergrad)
# the toy's Adam-scaled inner step: 1e-4 moves attn2 by 0.18% (relative) per simulated attack, as the earlier
# SGD step of 1.0 did (measured 0.178%); 1e-3 (the toy Custom Diffusion attacker's lr) moves it 1.8%
TOY_INNER_LR = 1e-4


@dataclass
class ImmunizeConfig:
    """Plain-data settings of one immunization run. Defaults are the paper's SD v1-4 ones; see
    :meth:`toy` for the values measured on the embedded toy model."""

    method: str = "mima"  # 'mima' | 'imma' | 'imma-sequential' | 'imma-joint'
    # 2: the exact hypergradient through the inner step and the merge (the paper); 1: first order, the merged
    # weights as constants (the reference code is first order too, but alternates and commits its inner step)
    order: int = 2
    steps: int = 500  # outer steps (imma-sequential: per concept)
    inner_lr: float = 1e-5  # alpha: the simulated attacker's learning rate (for 'lora': the adapter's)
    # 'adam': Adam's first step, alpha per element in RMS (paramsets.inner_step_size), the scale of the AdamW
    # attacker alpha comes from; 'sgd': theta - alpha * grad (alpha must then match the gradient's scale)
    inner_scaling: str = "adam"
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
    # 'all' (the paper): S_u changes freely; 'targets': the change of cross-attention K/V is kept only along the
    # text-state rows the targets own, so prompts that share none of them are drawn as before (method/selective.py)
    outer_rows: str = "all"
    # with outer_rows='targets': prompts whose text rows the change must leave alone too, although the targets
    # share them. Personalization gives the instances' classes ("a photo of a cat" for "a photo of <new1> cat"):
    # the instance is protected, its class stays drawable (measured: README, "The seed grid")
    protect_prompts: list[str] = field(default_factory=list)
    # with outer_rows='targets': keep only the directions of the targets' rows with at least this many times the
    # energy of the kept (prior) prompts' rows (0: every owned row). What leaks onto untargeted prompts is what
    # their rows share with the targets'; the prior's rows show what every prompt carries (method/selective.py)
    row_contrast: float = 0.0
    # with row_contrast > 0: more prompts whose rows count as kept in that contrast, besides the prior's (no loss
    # on them). The toy's personalization default: every other base concept (experiment/config.immunize_config)
    contrast_prompts: list[str] = field(default_factory=list)
    # with outer_rows='targets': directions of the targets' rows whose singular value is below this fraction of
    # the largest are left out of the span. A concept's rows are nearly rank one (name, EOS and padding agree);
    # the weak directions carry almost none of the targets' K/V but can be another concept's main one
    row_rtol: float = 1e-3
    # with outer_rows='targets': the most the targets' K/V outputs may move, relative to their norm, per layer
    # (None: no limit). Untargeted prompts lose about this times their overlap with the targets' rows
    kv_budget: float | None = None
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
    # memory flat in N, second order by Hessian-vector products (mima_lib.method.hypergrad; order 1: streamed)
    hypergrad: str = "autograd"
    hvp_scheme: str = "central"  # 'central' | 'forward' finite differences of gradients | 'jvp' (exact)
    hvp_eps: float | None = None  # relative finite-difference step; None: by precision (hypergrad.default_hvp_eps)
    concept_chunk: int = 1  # 'hvp': concepts per upper-level forward pass (more: faster, more memory)
    # every k steps log the cosine of the order-1 and order-2 hypergradients and the second-order share
    # (one extra backward of the upper loss on those steps; the streamed step logs them every step); 0: never
    diagnose_every: int = 10

    @classmethod
    def toy(cls, **overrides) -> "ImmunizeConfig":
        """Settings measured on the embedded toy model (tests/test_immunize.py, scripts/demo_immunize.py).

        inner_lr=TOY_INNER_LR (Adam-scaled): the simulated attack moves attn2 as far as the SGD step of 1.0
        did that lowered a concept's loss by ~1% (larger steps overshot).
        outer_lr=1e-2 (AdamW) with outer_rows='targets': on the v2 model, 15 steps on cat + van gogh raise
        their merged-attack loss by +898% / +381% while five untargeted concepts' plain loss moves by
        -0.1..+12.5%; with all rows free the same steps raise the untargeted ones by +49..+204%, and 1e-3 (the
        v1 value) raised the targets by only +6% / +4% (the setting of tests/test_immunize.py's behaviour test).
        steps=45: after erasing cat + van gogh and a 40-step LoRA attack (tests/test_selectivity.py, 8
        generations), 30 steps left cat at 75% / van gogh 12%, 45 steps 0% / 12%, untargeted dog and monet
        unchanged either way; on 6 targets 60 steps lost the untargeted cup (100% -> 0%) where 30 kept it.
        prior_weight=3 on the immunized weights: with the reference's (1.0, on theta*) the loss of
        untargeted concepts rose as much as the targets' (the noise-prediction loss is mostly
        prompt-independent, so ascent first finds generic damage; the prior must outweigh it).
        kv_budget=None (no cap): on 6 targets the 45 steps move the targets' K/V outputs to 5-9 times their norm
        and an untargeted object's by 0.70 (lost); a cap of 3 kept every untargeted concept exact, but LoRA
        re-learned the targets to 57% at step 40 instead of 29% (README, issue #14's bar 4; the v2 model).
        row_rtol=0.1: a concept's rows are nearly rank one (second singular value 1.5-8% of the first), and
        the weak directions that rtol 1e-3 keeps carry almost none of the targets' K/V but can be another
        concept's main direction. On the v4 model with row_rtol=0.1 and no cap, MIMA then LoRA on a held-out
        set of 6 targets (seed 1): 24% at step 40, all ten untargeted concepts exact (README, "The embedded
        default").
        outer_params='xattn-kv': with the Adam-scaled inner step, ascending all of attn2 (q, k, v, out)
        raised an untargeted artist's loss by +105% in 15 steps (v1), K/V only by +20%."""
        base = dict(steps=45, inner_lr=TOY_INNER_LR, outer_lr=1e-2, inner_params="xattn", outer_params="xattn-kv",
                    outer_rows="targets", batch_size=2, prior_weight=3.0, prior_on="immunized", row_rtol=0.1)
        return cls(**{**base, **overrides})

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.order not in (1, 2):
            raise ValueError(f"order must be 1 (first-order, reference code) or 2 (exact hypergradient), "
                             f"got {self.order!r}")
        check_set(self.inner_params, "inner")
        check_set(self.outer_params, "outer")
        for name in ("inner_lr", "outer_lr"):
            if isinstance(getattr(self, name), str):  # YAML reads 1e-2 (no dot) as a string
                raise ValueError(f"{name} must be a number, got the string {getattr(self, name)!r}; write it "
                                 "with a dot, e.g. 1.0e-2 or 0.01")
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.steps < 0 or self.batch_size < 1 or self.lora_rank < 1 or self.prior_weight < 0:
            raise ValueError("need steps >= 0, batch_size >= 1, lora_rank >= 1 and prior_weight >= 0")
        if self.inner_scaling not in ("adam", "sgd"):
            raise ValueError(f"inner_scaling must be 'adam' or 'sgd', got {self.inner_scaling!r}")
        if self.diagnose_every < 0:
            raise ValueError(f"diagnose_every must be >= 0, got {self.diagnose_every!r}")
        if self.prior_on not in ("merged", "immunized"):
            raise ValueError(f"prior_on must be 'merged' or 'immunized', got {self.prior_on!r}")
        if self.outer_rows not in ("all", "targets"):
            raise ValueError(f"outer_rows must be 'all' (the paper) or 'targets' (selective), got {self.outer_rows!r}")
        if self.protect_prompts and self.outer_rows != "targets":
            raise ValueError(f"protect_prompts {list(self.protect_prompts)} act on the selective update only; set "
                             "outer_rows: targets, or leave protect_prompts out")
        if self.kv_budget is not None and (self.outer_rows != "targets" or not self.kv_budget > 0):
            raise ValueError(f"kv_budget must be > 0 and needs outer_rows: targets, got {self.kv_budget!r} with "
                             f"outer_rows {self.outer_rows!r}; or leave kv_budget out (no limit)")
        if not 0 <= self.row_rtol < 1:
            raise ValueError(f"row_rtol must be in [0, 1) (the fraction of the largest singular value below which "
                             f"a direction of the targets' rows is left out), got {self.row_rtol!r}")
        if not self.row_contrast >= 0:
            raise ValueError(f"row_contrast must be >= 0 (0: no narrowing), got {self.row_contrast!r}")
        if self.contrast_prompts and not (self.outer_rows == "targets" and self.row_contrast > 0):
            raise ValueError(f"contrast_prompts ({len(self.contrast_prompts)}) act on the selective update's "
                             "contrast only; set outer_rows: targets and row_contrast > 0, or leave them out")
        if self.outer_rows == "targets" and self.hypergrad == "hvp":
            raise ValueError("outer_rows='targets' is implemented for hypergrad='autograd' only")
        if self.concept_reduction not in ("mean", "sum"):
            raise ValueError(f"concept_reduction must be 'mean' or 'sum', got {self.concept_reduction!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use 'adamw' or 'sgd'")
        if self.hypergrad not in ("autograd", "hvp"):
            raise ValueError(f"hypergrad must be 'autograd' or 'hvp', got {self.hypergrad!r}")
        if self.hvp_scheme not in SCHEMES:
            raise ValueError(f"unknown hvp_scheme {self.hvp_scheme!r}; choose one of {', '.join(SCHEMES)}")
        if (self.hvp_eps is not None and not self.hvp_eps > 0) or self.concept_chunk < 1:
            raise ValueError(f"need hvp_eps > 0 or None, concept_chunk >= 1: {self.hvp_eps!r}, {self.concept_chunk!r}")


@dataclass
class Problem:
    unet: object
    sched: object
    cfg: ImmunizeConfig
    prompts: list[str]  # one per concept, the key of its data
    latents: list[Tensor]  # per concept (n_i, C, h, w)
    states: Tensor  # (N, T, D): the UNet conditioning of each concept prompt
    token_rows: list[Tensor]  # per concept: its prompt's hidden-state rows after BOS, to EOS (the merge's C[n])
    reg_rows: Tensor  # C_reg: the same rows of the regularization captions
    reg_prompts: list[str]
    prior_latents: list[Tensor]  # per regularization prompt
    prior_states: Tensor | None  # (P, T, D)
    params: dict[str, Tensor]  # name -> the UNet's parameter
    inner_names: list[str]  # S_l
    outer_names: list[str]  # S_u
    outer_set: frozenset
    # the attacker's step sizes, held: None computes them from each step's gradients (the run); a dict records
    # them on first use by (unit, tensor) and replays them after, so that finite differences of the objective
    # see the same constants the hypergradient treats as constants (tests)
    step_sizes: dict | None = None


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


def prepare(pipe, concept_images: dict, reg_images, reg_prompt, cfg: ImmunizeConfig,
            reg_captions=None) -> Problem:
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
        # BOS is dropped, as in the reference code: it is the same row for every prompt (a causal encoder), so
        # constraining it would move every prompt's attention sink to one concept's adapted output
        token_rows = [t[1:].to(dev, dt) for t in encode_prompt_tokens(pipe, prompts)]
        caps = list(reg_captions) if reg_captions is not None else list(GENERIC_CAPTIONS)
        reg_rows = torch.cat([t[1:] for t in encode_prompt_tokens(pipe, caps)]).to(dev, dt) if caps \
            else token_rows[0][:0]
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
