"""LoRA attack: low-rank adapters on the UNet's attention layers through peft (`unet.add_adapter`),
saved in diffusers' LoRA format so `pipe.load_lora_weights` reloads them. The paper reports step 400
at batch size 4 (reference code: diffusers' train_text_to_image_lora.py, lr 1e-4, rank 4, random flip).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig

from .common import LORA_SNAPSHOT_STEPS, AttackResult, attack_setup, finetune, freeze_pipeline

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class LoraSettings:
    """LoRA attack settings; the defaults are the paper's (SD v1-4). `LoraSettings.toy()` for the toy model."""

    steps: int = 400
    lr: float = 1e-4
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1)
    batch_size: int = 4
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    hflip: bool = True  # the reference script's --random_flip
    schedule: str = "constant"  # 'constant' (the reference scripts') | 'cosine' (decays to 0 at `steps`)
    seed: int = 0
    adapter_name: str = "attack"
    snapshot_steps: tuple[int, ...] = LORA_SNAPSHOT_STEPS

    @classmethod
    def paper(cls, **overrides) -> "LoraSettings":
        return replace(cls(), **overrides)

    @classmethod
    def toy(cls, **overrides) -> "LoraSettings":
        """Measured on the toy model (erased 'cat', 20 attacker renders, oracle accuracy at guidance 7.5):
        lr 3e-3 reaches 0.62-1.0 by steps 40-100 over three seeds; lr 1e-3 is slower and noisier."""
        return replace(cls(lr=3e-3, steps=100, hflip=False), **overrides)


def lora_attack(pipe, images, prompt: str, settings: LoraSettings | None = None,
                **finetune_kwargs) -> AttackResult:
    """Add a LoRA adapter to pipe.unet (in place) and train it on the concept's images.

    finetune_kwargs: snapshot_steps, snapshot_prompts, snapshot_seeds, sample_steps, guidance,
    checkpoint_dir, progress, class_images/class_prompt/prior_weight (see common.finetune_concepts).
    """
    settings = settings or LoraSettings()
    cfg, kw = attack_setup(settings, "lora", finetune_kwargs, pipe, [(images, prompt)])
    if settings.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {settings.rank}")
    if settings.adapter_name in getattr(pipe.unet, "peft_config", {}):
        raise ValueError(f"pipe.unet already has a LoRA adapter named {settings.adapter_name!r}; use another "
                         "adapter_name, or attack a fresh copy of the model (copy_pipeline)")
    freeze_pipeline(pipe)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank, init_lora_weights="gaussian",
                        target_modules=list(settings.target_modules))
    torch.manual_seed(settings.seed)  # the adapter's random init is part of the seeded run
    pipe.unet.add_adapter(config, adapter_name=settings.adapter_name)
    params = {n: p for n, p in pipe.unet.named_parameters()
              if "lora" in n and f".{settings.adapter_name}." in n + "." and p.requires_grad}
    if not params:
        raise ValueError(f"LoRA found no layers named {settings.target_modules} in the UNet")
    result = finetune(pipe, images, prompt, params, cfg, batch_size=settings.batch_size, hflip=settings.hflip,
                      **kw)
    result.method, result.settings = "lora", settings
    return result


def save_lora(pipe, folder, adapter_name: str = "attack") -> Path:
    """Write the adapter as <folder>/pytorch_lora_weights.safetensors in diffusers' format (with its
    rank/alpha as metadata); `pipe.load_lora_weights(folder)` or `load_lora` reloads it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in getattr(pipe.unet, "peft_config", {}):
        raise ValueError(f"pipe.unet has no LoRA adapter named {adapter_name!r}; "
                         f"adapters: {sorted(getattr(pipe.unet, 'peft_config', {}))}")
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name=adapter_name))
    conf = pipe.unet.peft_config[adapter_name]
    metadata = {"r": conf.r, "lora_alpha": conf.lora_alpha, "target_modules": sorted(conf.target_modules)}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, safe_serialization=True,
                                              unet_lora_adapter_metadata=metadata)
    return Path(folder) / LORA_WEIGHT_NAME


def load_lora(pipe, folder, adapter_name: str = "attack"):
    """Load a LoRA saved by `save_lora` (or any diffusers SD LoRA) into pipe, in place; returns pipe."""
    folder = Path(folder)
    if folder.is_dir() and not (folder / LORA_WEIGHT_NAME).exists():
        raise FileNotFoundError(f"no {LORA_WEIGHT_NAME} in {folder}; save one with save_lora(pipe, folder)")
    if not folder.exists():
        raise FileNotFoundError(f"LoRA folder {folder} does not exist")
    pipe.load_lora_weights(str(folder), adapter_name=adapter_name)
    return pipe
