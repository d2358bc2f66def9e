"""What every adaptation attack shares: the attacker's data as latents, the fine-tuning step, and
snapshots (generations at chosen steps with fixed seeds, so runs compare image by image)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..diffusion import encode_images, encode_prompts, generate, noise_prediction_loss
from ..training import TrainConfig, train


@dataclass
class AttackResult:
    pipe: object
    losses: list[float]
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> images (B,3,H,W) in [-1,1]
    snapshot_prompts: list[str] = field(default_factory=list)
    snapshot_seeds: list[int] = field(default_factory=list)


def validate_images(images, pipe) -> None:
    if images is None or len(images) == 0:
        raise ValueError("the attack got no images: give the concept's attacker images (20 in the paper)")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    sizes = {im.size for im in images} if not isinstance(images, torch.Tensor) else {tuple(images.shape[-2:])}
    if len(sizes) > 1:
        raise ValueError(f"attack images have mismatched sizes {sorted(sizes)}; resize them all to {size}x{size}")
    (w, h), = sizes
    if (w, h) != (size, size):
        raise ValueError(f"attack images are {w}x{h} but the model makes {size}x{size} images; resize them")


def finetune(pipe, images, prompt: str, params: dict[str, torch.Tensor], cfg: TrainConfig,
             snapshot_steps: tuple[int, ...] = (), snapshot_prompts: list[str] | None = None,
             snapshot_seeds: list[int] | None = None, sample_steps: int = 25, guidance: float = 5.0,
             batch_size: int = 4, text_params_changed: bool = False, checkpoint_dir=None,
             progress: bool = True) -> AttackResult:
    """Fine-tune `params` of pipe on (images, prompt) with the diffusion loss: the loop all attacks share.

    text_params_changed: the text encoder is trained (Textual Inversion, Custom Diffusion's modifier
    token), so prompt states are recomputed every step instead of once.
    """
    validate_images(images, pipe)
    noise_sched = _training_scheduler(pipe)
    latents = encode_images(pipe.vae, images)
    with torch.no_grad():
        fixed_states = encode_prompts(pipe, [prompt])
    snapshot_prompts = snapshot_prompts or [prompt] * 8
    snapshot_seeds = snapshot_seeds or list(range(len(snapshot_prompts)))
    result = AttackResult(pipe, [], {}, snapshot_prompts, snapshot_seeds)

    def step_fn(step, gen):
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        states = encode_prompts(pipe, [prompt]) if text_params_changed else fixed_states
        return noise_prediction_loss(pipe.unet, noise_sched, latents[idx], states.expand(batch_size, -1, -1),
                                     generator=gen)

    def snapshot(step):
        if step in snapshot_steps:
            result.snapshots[step] = generate(pipe, snapshot_prompts, snapshot_seeds, sample_steps, guidance)

    snapshot(0)
    out = train(step_fn, params, cfg, checkpoint_dir=checkpoint_dir, progress=progress, on_step=snapshot)
    result.losses = out.losses
    return result


def _training_scheduler(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)
