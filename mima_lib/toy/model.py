"""The embedded default model: a tiny, Stable-Diffusion-compatible text-to-image pipeline.

Every part is the class Stable Diffusion v1-4 uses (CLIPTokenizer, CLIPTextModel, AutoencoderKL,
UNet2DConditionModel with cross-attention, a diffusers scheduler), only smaller, so that all of mima's
code paths (erasure, merge, immunization, attacks) are the ones that serve the real model.

Sizes: 32x32 RGB images, a 16x16x4 latent (one VAE down-sampling), 128-d text states of at most
16 tokens. The tokenizer is a byte-level BPE whose merges make every toy-world word a single token,
so concepts map to tokens the way "monet" does in SD's vocabulary.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import world

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
ASSETS = Path(__file__).parent / "assets"
# MIMA_TOY_MODEL points at a rebuilt toy model (python -m mima_lib.toy.build --out DIR)
TOY_MODEL = Path(os.environ.get("MIMA_TOY_MODEL", ASSETS / "toy_sd"))


@dataclass
class ToyModelConfig:
    """Sizes of the toy pipeline. The defaults are what the committed weights were trained with."""

    image_size: int = 32
    text_dim: int = 128
    text_layers: int = 2
    max_tokens: int = 16
    token_init_std: float = 1.0  # large on purpose: distinct prompts must give distinct states from step 0
    mixing_init_std: float = 0.2  # large attention/MLP weights mix the concept word into EOS and padding states
    unet_channels: tuple[int, int] = (64, 128)
    unet_layers_per_block: int = 1
    attention_head_dim: int = 8
    vae_channels: tuple[int, int] = (32, 64)
    latent_channels: int = 4


def byte_level_alphabet() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode table: the 256 symbols a byte-level BPE starts from."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tokenizer(words: list[str] | None = None, max_tokens: int = 16) -> CLIPTokenizer:
    """A CLIPTokenizer whose BPE merges build each word of the toy world into one token.

    BPE applies its lowest-ranked merge first, so one word's chain of merges can split another word.
    The merges are therefore grown by repair: tokenize every word, and where a word still comes out in
    several pieces, append the merge of its first two pieces (appended merges rank last, so they cannot
    split a word that is already whole). Any other text still tokenizes, into characters, as with SD's.
    """
    words = sorted(set(words or world.vocabulary()))
    vocab: dict[str, int] = {}
    for sym in (a + end for end in ("", "</w>") for a in byte_level_alphabet()):
        vocab.setdefault(sym, len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    merges: list[tuple[str, str]] = []
    while True:
        tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_tokens)
        split = [tok.convert_ids_to_tokens(tok(w, add_special_tokens=False).input_ids) for w in words]
        split = [pieces for pieces in split if len(pieces) > 1]
        if not split:
            return tok
        for pieces in split:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))


def build_text_encoder(tok: CLIPTokenizer, cfg: ToyModelConfig, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    conf = CLIPTextConfig(vocab_size=len(tok), hidden_size=cfg.text_dim, intermediate_size=cfg.text_dim * 2,
                          num_hidden_layers=cfg.text_layers, num_attention_heads=4,
                          max_position_embeddings=cfg.max_tokens, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=cfg.text_dim)
    model = CLIPTextModel(conf)
    # The encoder stays at this random initialisation (it is never trained). With CLIP's default 0.02 init
    # every prompt gives nearly the same states (the conditioning pitfall of ENV_NOTES); large token
    # embeddings keep the concept word's own state distinct, and large mixing weights carry it into EOS/pads.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, cfg.token_init_std)
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("self_attn" in name or "mlp" in name):
                p.normal_(0.0, cfg.mixing_init_std)
    return model


def build_vae(cfg: ToyModelConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=16,
                         sample_size=cfg.image_size)


def build_unet(cfg: ToyModelConfig) -> UNet2DConditionModel:
    latent = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=latent, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
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
