"""The few diffusion operations every stage shares: encode prompts and images, the noise-prediction loss,
and seeded generation. They work on any diffusers StableDiffusionPipeline (the toy model or SD v1-4)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def training_scheduler(pipe):
    """A DDPM scheduler with the pipeline's noise schedule: the one training losses draw timesteps from."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def encode_prompts(pipe, prompts: list[str], device=None) -> torch.Tensor:
    """Text-encoder hidden states (B, T, D), exactly as the SD pipeline conditions its UNet."""
    tok = pipe.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    device = device or pipe.text_encoder.device
    return pipe.text_encoder(ids.to(device))[0]


def images_to_tensor(images) -> torch.Tensor:
    """PIL images (or a (B,3,H,W) tensor in [-1,1]) -> float tensor in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        return images
    arr = np.stack([np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B,3,H,W) in [-1,1] -> PIL images."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def encode_images(vae, images, sample: bool = False, generator=None) -> torch.Tensor:
    """Images -> scaled latents (the distribution's mean unless sample=True), as SD training does."""
    x = images_to_tensor(images).to(vae.device, vae.dtype)
    dist = vae.encode(x).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return z * vae.config.scaling_factor


def draw_noise(latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | None):
    """The random draws of one training loss (noise, then timesteps), made on the generator's device and
    moved to the latents' device: a CPU generator (the seeded default) drives a GPU run."""
    gdev = generator.device if generator is not None else latents.device
    noise = torch.randn(latents.shape, generator=generator, device=gdev, dtype=latents.dtype).to(latents.device)
    t = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator,
                      device=gdev).to(latents.device)
    return noise, t


def noise_loss(unet, noise_scheduler, latents: torch.Tensor, text_states: torch.Tensor, noise: torch.Tensor,
               t: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """The noise-prediction MSE for given draws (one value per example unless reduction='mean')."""
    noisy = noise_scheduler.add_noise(latents, noise, t)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    pred = unet(noisy, t, text_states).sample
    dtype = torch.promote_types(pred.dtype, torch.float32)  # fp16/bf16 -> fp32; float64 stays (gradcheck)
    per_example = (pred.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)
    return per_example if reduction == "none" else per_example.mean()


def noise_prediction_loss(unet, noise_scheduler, latents: torch.Tensor, text_states: torch.Tensor,
                          generator: torch.Generator | None = None, reduction: str = "mean") -> torch.Tensor:
    """The diffusion training loss: MSE between the true and predicted noise at a random timestep.

    reduction='none' returns one loss per example, so callers can weight or split by concept.
    """
    noise, t = draw_noise(latents, noise_scheduler.config.num_train_timesteps, generator)
    return noise_loss(unet, noise_scheduler, latents, text_states, noise, t, reduction)


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 5.0,
             batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Generate one image per (prompt, seed) pair, deterministically; returns (B,3,H,W) in [-1,1].

    Each image has its own generator, so image i depends only on its prompt and seed, not on batching:
    immunized and non-immunized runs can be compared image by image.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    pipe.set_progress_bar_config(disable=not progress)
    out = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        res = pipe(list(prompts[i:i + batch_size]), num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, output_type="pt")
        out.append(res.images * 2 - 1)  # the pipeline returns [0, 1]
    return torch.cat(out).cpu()
