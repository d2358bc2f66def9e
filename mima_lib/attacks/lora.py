"""LoRA attack: low-rank adapters on the UNet's attention layers through peft, saved in diffusers'
LoRA format so `pipe.load_lora_weights` reloads them. The paper reports step 400 at batch size 4."""
from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig

from ..training import TrainConfig
from .common import AttackResult, finetune

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LoraSettings:
    steps: int = 400
    lr: float = 1e-4
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1)
    batch_size: int = 4
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0
    adapter_name: str = "attack"


def lora_attack(pipe, images, prompt: str, settings: LoraSettings = LoraSettings(), **finetune_kwargs) -> AttackResult:
    """Add a LoRA adapter to pipe.unet (in place) and train it on the concept's images."""
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank, init_lora_weights="gaussian",
                        target_modules=list(settings.target_modules))
    pipe.unet.add_adapter(config, adapter_name=settings.adapter_name)
    params = {n: p for n, p in pipe.unet.named_parameters() if "lora" in n and p.requires_grad}
    cfg = TrainConfig(steps=settings.steps, lr=settings.lr, seed=settings.seed, desc="lora")
    return finetune(pipe, images, prompt, params, cfg, batch_size=settings.batch_size, **finetune_kwargs)


def save_lora(pipe, folder, adapter_name: str = "attack") -> None:
    """Write the adapter as pytorch_lora_weights.safetensors (diffusers' format)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name=adapter_name))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, safe_serialization=True)
