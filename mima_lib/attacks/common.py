"""What every adaptation attack shares: the attacker's data as latents, the fine-tuning step, and
snapshots (generations at chosen steps with fixed seeds, so runs compare image by image).

All four attacks (LoRA, DreamBooth, Textual Inversion, Custom Diffusion) differ only in *which*
parameters they train and how they prepare the model (an adapter, a new token); the loop itself is
`finetune_concepts` below, which runs on `mima_lib.training.train` (the loop the toy model and the
immunizers use: seeded, progress bar, checkpoint/resume).

In place: an attack changes the pipeline it is given (adapter added, weights trained, tokens added).
To keep the original, pass a copy (`copy_pipeline(pipe)`, or `run_attack(..., copy=True)`).
"""
from __future__ import annotations

import copy as _copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..method.diffusion import (encode_images, encode_prompts, generate, images_to_tensor, noise_prediction_loss,
                                tensor_to_images, training_scheduler)
from ..method.tensor_io import load_tensors, save_tensors
from ..method.training import TrainConfig, train

# Steps at which attacks generate snapshot images by default: before the attack (0) and every 10 steps
# up to 40 (the paper's tables report step 40); LoRA adds 100/200/400 (its figures report step 400).
DEFAULT_SNAPSHOT_STEPS = (0, 10, 20, 30, 40)
LORA_SNAPSHOT_STEPS = DEFAULT_SNAPSHOT_STEPS + (100, 200, 400)
DEFAULT_SNAPSHOT_IMAGES = 8  # per prompt, seeds 0..7


@dataclass
class AttackResult:
    """What an attack returns: the adapted pipeline (the same object it was given), the loss per step,
    and snapshot generations {step: images (B,3,H,W) in [-1,1]} for fixed prompts and seeds."""

    pipe: object
    losses: list[float]
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> images (B,3,H,W) in [-1,1]
    snapshot_prompts: list[str] = field(default_factory=list)
    snapshot_seeds: list[int] = field(default_factory=list)
    method: str = ""
    settings: object = None
    tokens: list[str] = field(default_factory=list)  # tokens the attack added to the tokenizer
    resumed_from: int = 0  # >0 when the run continued from a checkpoint (earlier snapshots are not redone)

    @property
    def steps(self) -> int:
        return len(self.losses)  # on resume, the checkpoint's earlier losses are included

    def images_at(self, step: int) -> torch.Tensor:
        """Snapshot images at `step`; a clear error lists the steps that were taken."""
        if step not in self.snapshots:
            raise KeyError(f"no snapshot at step {step}; snapshots were taken at {sorted(self.snapshots)}")
        return self.snapshots[step]


def copy_pipeline(pipe):
    """An independent copy of a pipeline (deepcopy): attack the copy to keep the original intact.

    Cheap for the toy model (~0.1 s); for SD v1-4 it doubles GPU memory, so reload instead if tight."""
    return _copy.deepcopy(pipe)


def model_image_size(pipe) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def validate_images(images, pipe, what: str = "attack images") -> None:
    """Fail early and clearly on an empty image set or sizes the model cannot take."""
    if images is None or len(images) == 0:
        raise ValueError(f"the attack got no {what}: give the concept's attacker images (20 in the paper)")
    size = model_image_size(pipe)
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{what} tensor must be (B,3,H,W) in [-1,1], got shape {tuple(images.shape)}")
        sizes = {(int(images.shape[-1]), int(images.shape[-2]))}
    else:
        sizes = set()
        for i, im in enumerate(images):
            if not hasattr(im, "size") or not hasattr(im, "convert"):
                raise TypeError(f"{what}[{i}] is a {type(im).__name__}, not a PIL image; load images with "
                                "PIL.Image.open or mima_lib.attacks.data.load_concept_folder")
            sizes.add(tuple(im.size))
    if len(sizes) > 1:
        raise ValueError(f"{what} have mismatched sizes {sorted(sizes)}; resize them all to {size}x{size} "
                         "(attacks.data.load_concept_folder(..., resize=True) does it)")
    (w, h), = sizes
    if (w, h) != (size, size):
        raise ValueError(f"{what} are {w}x{h} but the model makes {size}x{size} images; resize them "
                         "(attacks.data.load_concept_folder(..., resize=True) does it)")


def validate_prompt(prompt, what: str = "prompt", allow_empty: bool = False) -> str:
    if not isinstance(prompt, str) or not (prompt.strip() or allow_empty):
        raise ValueError(f"the attack's {what} must be a non-empty string, got {prompt!r}")
    return prompt


def generate_class_images(pipe, class_prompt: str, n: int, seed: int = 1_000_000, sample_steps: int = 25,
                          guidance: float = 5.0, progress: bool = False):
    """Prior-preservation images: what the model itself makes for the class prompt (DreamBooth's recipe)."""
    x = generate(pipe, [class_prompt] * n, list(range(seed, seed + n)), sample_steps, guidance, progress=progress)
    return tensor_to_images(x)


def finetune(pipe, images, prompt: str, params: dict[str, torch.Tensor], cfg: TrainConfig,
             snapshot_steps: tuple[int, ...] = (), snapshot_prompts: list[str] | None = None,
             snapshot_seeds: list[int] | None = None, sample_steps: int = 25, guidance: float = 5.0,
             batch_size: int = 4, text_params_changed: bool = False, checkpoint_dir=None,
             progress: bool = True, **kwargs) -> AttackResult:
    """Fine-tune `params` of pipe on (images, prompt) with the diffusion loss: the loop all attacks share.

    text_params_changed: the text encoder is trained (Textual Inversion, Custom Diffusion's modifier
    token), so prompt states are recomputed every step instead of once. Further keyword arguments
    (class_images, class_prompt, prior_weight, hflip, after_step) are those of `finetune_concepts`.
    """
    return finetune_concepts(pipe, [(images, prompt)], params, cfg, snapshot_steps=snapshot_steps,
                             snapshot_prompts=snapshot_prompts, snapshot_seeds=snapshot_seeds,
                             sample_steps=sample_steps, guidance=guidance, batch_size=batch_size,
                             text_params_changed=text_params_changed, checkpoint_dir=checkpoint_dir,
                             progress=progress, **kwargs)


def _latents_of(pipe, images, hflip: bool) -> torch.Tensor:
    """(2 if hflip else 1, N, C, h, w): latents of the images and, with hflip, of their mirror images."""
    x = images_to_tensor(images)
    outs = [encode_images(pipe.vae, x)]
    if hflip:
        outs.append(encode_images(pipe.vae, torch.flip(x, dims=[-1])))
    return torch.stack(outs)


def finetune_concepts(pipe, concepts: Sequence[tuple], params: dict[str, torch.Tensor], cfg: TrainConfig,
                      snapshot_steps: Sequence[int] = (), snapshot_prompts: list[str] | None = None,
                      snapshot_seeds: list[int] | None = None, sample_steps: int = 25, guidance: float = 5.0,
                      batch_size: int = 4, text_params_changed: bool = False, checkpoint_dir=None,
                      progress: bool = True, class_images=None, class_prompt: str | None = None,
                      prior_weight: float = 1.0, hflip: bool = False,
                      after_step: Callable[[int], None] | None = None) -> AttackResult:
    """Fine-tune `params` on one or more concepts [(images, prompt), ...] jointly (multi-concept Custom
    Diffusion trains several at once).

    Each step draws `batch_size` examples: a concept uniformly at random, then one of its images (data
    is keyed by concept, never by prompt, so concepts sharing a prompt are not merged). With
    `class_images` and `class_prompt` (prior preservation), each step also draws `batch_size` class
    examples and adds `prior_weight` x their loss. `hflip` mirrors each example with probability 1/2.
    `after_step(step)` runs after every optimizer update (Textual Inversion restores frozen rows there).

    Snapshots: at every step in `snapshot_steps` (0 = before training) the pipe generates one image per
    (snapshot_prompts[i], snapshot_seeds[i]); default: 8 images per concept prompt, seeds 0..7.
    All randomness comes from cfg.seed, so a run repeats bit for bit.
    """
    if not concepts:
        raise ValueError("finetune_concepts: no concepts given; pass [(images, prompt), ...]")
    for i, (ims, p) in enumerate(concepts):
        validate_images(ims, pipe, "attack images" if len(concepts) == 1 else f"attack images of concept {i}")
        validate_prompt(p)
    use_prior = class_images is not None or class_prompt is not None
    if use_prior:
        if class_images is None or class_prompt is None:
            raise ValueError("prior preservation needs both class_images and class_prompt")
        validate_images(class_images, pipe, "class (prior-preservation) images")
        validate_prompt(class_prompt, "class_prompt", allow_empty=True)  # "": the unconditional prompt
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    noise_sched = training_scheduler(pipe)
    latents = [_latents_of(pipe, ims, hflip) for ims, _ in concepts]
    prior_latents = _latents_of(pipe, class_images, hflip) if use_prior else None
    prompts = [p for _, p in concepts]
    unique = sorted(set(prompts + ([class_prompt] if use_prior else [])))
    concept_prompt_idx = torch.tensor([unique.index(p) for p in prompts])
    with torch.no_grad():
        fixed_states = encode_prompts(pipe, unique)
    if snapshot_prompts is None:
        distinct = list(dict.fromkeys(prompts))
        snapshot_prompts = [p for p in distinct for _ in range(DEFAULT_SNAPSHOT_IMAGES)]
        if snapshot_seeds is None:
            snapshot_seeds = list(range(DEFAULT_SNAPSHOT_IMAGES)) * len(distinct)
    if snapshot_seeds is None:
        snapshot_seeds = list(range(len(snapshot_prompts)))
    if len(snapshot_seeds) != len(snapshot_prompts):
        raise ValueError(f"{len(snapshot_prompts)} snapshot prompts but {len(snapshot_seeds)} snapshot seeds")
    snapshot_steps = set(int(s) for s in snapshot_steps)
    result = AttackResult(pipe, [], {}, list(snapshot_prompts), list(snapshot_seeds))

    def sample(lat: torch.Tensor, gen) -> torch.Tensor:
        """One random example of a concept's latents, mirrored with probability 1/2 under hflip."""
        i = int(torch.randint(0, lat.shape[1], (1,), generator=gen))
        f = int(torch.rand(1, generator=gen) < 0.5) if hflip else 0
        return lat[f, i]

    def step_fn(step, gen):
        which = torch.randint(0, len(concepts), (batch_size,), generator=gen)
        x = torch.stack([sample(latents[c], gen) for c in which.tolist()])
        state_idx = concept_prompt_idx[which]
        if use_prior:
            x = torch.cat([x, torch.stack([sample(prior_latents, gen) for _ in range(batch_size)])])
            state_idx = torch.cat([state_idx, torch.full((batch_size,), unique.index(class_prompt))])
        states = encode_prompts(pipe, unique) if text_params_changed else fixed_states
        per = noise_prediction_loss(pipe.unet, noise_sched, x, states[state_idx], generator=gen, reduction="none")
        if not use_prior:
            return per.mean()
        inst, prior = per[:batch_size].mean(), per[batch_size:].mean()
        return inst + prior_weight * prior, {"instance": inst.detach(), "prior": prior.detach()}

    def snapshot(step):
        if step in snapshot_steps:
            result.snapshots[step] = generate(pipe, result.snapshot_prompts, result.snapshot_seeds, sample_steps,
                                              guidance)
            if checkpoint_dir:  # kept beside the checkpoint, so a resumed run still returns every snapshot
                _save_snapshot(checkpoint_dir, step, result.snapshots[step])

    def on_step(step):
        if after_step is not None:
            after_step(step)
        snapshot(step)

    if not (checkpoint_dir and _has_checkpoint(checkpoint_dir)):
        snapshot(0)
    elif checkpoint_dir:
        result.snapshots.update(_load_snapshots(checkpoint_dir))
    out = train(step_fn, params, cfg, checkpoint_dir=checkpoint_dir, progress=progress, on_step=on_step)
    result.losses = out.losses
    result.resumed_from = out.resumed_from
    return result


def _save_snapshot(folder, step: int, images: torch.Tensor) -> None:
    save_tensors({"images": images}, Path(folder) / f"snapshot_{step:06d}.safetensors")


def _load_snapshots(folder) -> dict[int, torch.Tensor]:
    return {int(p.stem.split("_")[1]): load_tensors(p)["images"]
            for p in sorted(Path(folder).glob("snapshot_*.safetensors"))}


def _has_checkpoint(folder) -> bool:
    return (Path(folder) / "checkpoint.pt").exists()


def freeze_pipeline(pipe) -> None:
    """requires_grad False on every part; an attack then unfreezes only what it trains."""
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        part.requires_grad_(False)


def attack_setup(settings, desc: str, finetune_kwargs: dict, pipe=None, concepts=()) -> tuple[TrainConfig, dict]:
    """Validate an attack's inputs before it changes the pipeline, and build its TrainConfig (from its
    settings) and the keyword arguments for finetune. concepts: [(images, prompt), ...].

    Settings own steps, lr, seed and batch size; finetune_kwargs may add snapshot_steps (default: the
    settings' that the run reaches, plus its last step), snapshot_prompts/seeds, sample_steps, guidance,
    progress, and checkpoint_dir with checkpoint_every (default 50 when a checkpoint_dir is given) for
    resumable runs."""
    owned = {"batch_size", "cfg", "params", "text_params_changed", "hflip", "after_step"}
    clash = owned & set(finetune_kwargs)
    if clash:
        raise TypeError(f"{sorted(clash)} are set through the attack's settings, not as keyword arguments")
    kw = dict(finetune_kwargs)
    every = kw.pop("checkpoint_every", None)
    if every is None:
        every = 50 if kw.get("checkpoint_dir") else 0
    # default: the settings' snapshot steps that the run reaches, plus its last step
    kw.setdefault("snapshot_steps", tuple(sorted({s for s in settings.snapshot_steps if s <= settings.steps}
                                                 | {settings.steps})))
    if settings.steps < 0:
        raise ValueError(f"steps must be >= 0, got {settings.steps}")
    for i, (ims, p) in enumerate(concepts):
        validate_images(ims, pipe, "attack images" if len(concepts) == 1 else f"attack images of concept {i}")
        validate_prompt(p)
    schedule = getattr(settings, "schedule", "constant")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    cfg = TrainConfig(steps=settings.steps, lr=settings.lr, seed=settings.seed, schedule=schedule,
                      checkpoint_every=every, desc=desc)
    return cfg, kw
