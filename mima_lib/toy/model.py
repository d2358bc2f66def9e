"""The embedded default model: a tiny, Stable-Diffusion-compatible text-to-image pipeline.

Every part is the class Stable Diffusion v1-4 uses (CLIPTokenizer, CLIPTextModel, AutoencoderKL,
UNet2DConditionModel with cross-attention, a diffusers scheduler), only smaller, so that all of mima's
code paths (erasure, merge, immunization, attacks) are the ones that serve the real model.

Sizes: 32x32 RGB images, a 16x16x4 latent (one VAE down-sampling), 128-d text states of at most
16 tokens. The tokenizer is a byte-level BPE whose merges make every toy-world word a single token,
so concepts map to tokens the way "monet" does in SD's vocabulary; the text encoder is pretrained once
before the UNet (mima_lib.toy.text).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from .text import build_text_encoder, build_tokenizer

ASSETS = Path(__file__).parent / "assets"
# MIMA_TOY_MODEL points at a rebuilt toy model (python -m mima_lib.toy.build --out DIR)
TOY_MODEL = Path(os.environ.get("MIMA_TOY_MODEL", ASSETS / "toy_sd"))


@dataclass
class ToyModelConfig:
    """Sizes of the toy pipeline. The defaults are what the committed weights were trained with."""

    image_size: int = 32
    text_dim: int = 256  # v4; v2 (assets/toy_sd_v2) had 128: README, "The embedded default", says why
    text_layers: int = 2
    max_tokens: int = 16
    token_init_std: float = 1.0  # large on purpose: distinct prompts must give distinct states from step 0
    mixing_init_std: float = 0.2  # large attention/MLP weights mix the concept word into EOS and padding states
    unet_channels: tuple[int, int] = (64, 128)
    unet_layers_per_block: int = 1
    # the first (full-resolution) level without attention, as SD's last level is: self-attention over 16x16
    # latents was half of the UNet's time on the CPU (measured 1.37 s vs 0.74 s per training step at batch 32),
    # and the text still reaches every level below it and the middle block
    attention_at_full_resolution: bool = False
    attention_head_dim: int = 8
    vae_channels: tuple[int, int] = (32, 64)
    latent_channels: int = 4


def build_vae(cfg: ToyModelConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=16,
                         sample_size=cfg.image_size)


def build_unet(cfg: ToyModelConfig) -> UNet2DConditionModel:
    latent = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    n = len(cfg.unet_channels)
    attn = [cfg.attention_at_full_resolution or level > 0 for level in range(n)]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DConditionModel(
        sample_size=latent, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=down, up_block_types=up,
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_dim, attention_head_dim=cfg.attention_head_dim, norm_num_groups=16)


def training_scheduler() -> DDPMScheduler:
    # Stable Diffusion's noise schedule (scaled linear, 1000 steps), so attacks and immunization match SD's.
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         steps_offset=1, clip_sample=False)


def sampling_scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def build_pipeline(cfg: ToyModelConfig | None = None, seed: int = 0) -> StableDiffusionPipeline:
    """A freshly initialised (untrained) toy pipeline."""
    cfg = cfg or ToyModelConfig()
    tok = build_tokenizer(max_tokens=cfg.max_tokens)
    text = build_text_encoder(tok, cfg, seed)
    torch.manual_seed(seed)
    vae, unet = build_vae(cfg), build_unet(cfg)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def load_toy_pipeline(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The embedded default: the committed toy pipeline, through the loader that serves SD v1-4."""
    from ..method.pipeline import load_pipeline

    if not TOY_MODEL.exists():
        raise FileNotFoundError(f"the embedded toy model is missing at {TOY_MODEL}; rebuild it with "
                                "`python -m mima_lib.toy.build` or restore it from git")
    return load_pipeline(TOY_MODEL, dtype=dtype, device=device)
