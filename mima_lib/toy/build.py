"""Build the embedded default from scratch: render the toy world, pretrain the text encoder, train the VAE,
the UNet and the oracle.

    python -m mima_lib.toy.build --out mima_lib/toy/assets --seed 0         # everything (see the README's time)
    python -m mima_lib.toy.build --stage oracle                             # one stage
    python -m mima_lib.toy.build --out DIR --text-dim 128 --text-spread 30 --text-span-weight 0 \
        --text-hinge-weight 0                                               # the earlier v2 (assets/toy_sd_v2)

Each stage checkpoints into <out>/_work and resumes if interrupted. The text encoder is pretrained first and
then frozen, as CLIP is for Stable Diffusion (mima_lib.toy.text says why and what for); the UNet learns to
read it, with classifier-free-guidance dropout to the empty prompt, and its weights are kept as an exponential
moving average (the EMA weights are the ones saved: smoother samples, the usual diffusion recipe).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..method.diffusion import encode_images, encode_prompts, images_to_tensor, noise_prediction_loss
from ..method.training import TrainConfig, train
from . import model as toymodel
from . import world
from .oracle import held_out_accuracy, train_oracle
from .text import pretrain_text_encoder, text_statistics

ASSETS = Path(__file__).parent / "assets"


@dataclass
class BuildConfig:
    seed: int = 0
    # the defaults build the committed default (v4); v2 (assets/toy_sd_v2): --text-dim 128 --text-spread 30
    # --text-span-weight 0 --text-hinge-weight 0 (README, "The embedded default")
    text_dim: int = toymodel.ToyModelConfig.text_dim  # width of the text states (and of attn2's K/V inputs)
    images_per_prompt: int = 300
    vae_steps: int = 800
    vae_batch: int = 32
    text_steps: int = 3000
    text_spread: float = 300.0  # weight of the text pretraining's orthogonality term (toy.text says why)
    # > 0: the v4 spread (every concept each step, rows kept out of the generic prompts' span; toy.text)
    text_span_weight: float = 30.0
    text_hinge_weight: float = 100.0
    unet_steps: int = 3500
    unet_batch: int = 32
    unet_lr: float = 5e-4
    ema: float = 0.999  # per-step decay of the UNet's EMA weights (0: save the raw weights)
    cfg_dropout: float = 0.1
    oracle_steps: int = 800  # with the "noise" label: 400 steps read 45 of 1152 broken images as a target, 800 read 30
    include_heldout: bool = False  # True only for ablations: the held-out concepts test adaptability


def render_training_set(cfg: BuildConfig) -> tuple[torch.Tensor, list[str]]:
    images, prompts = [], []
    for prompt, key in world.training_prompts(cfg.include_heldout):
        images += world.render_many(key, cfg.images_per_prompt, start_seed=0)
        prompts += [prompt] * cfg.images_per_prompt
    return images_to_tensor(images), prompts


def train_vae(vae, x: torch.Tensor, cfg: BuildConfig, work: Path, progress=True) -> None:
    vae.train()

    def step_fn(step, gen):
        batch = x[torch.randint(0, len(x), (cfg.vae_batch,), generator=gen)]
        dist = vae.encode(batch).latent_dist
        rec = vae.decode(dist.sample(gen)).sample
        mse = F.mse_loss(rec, batch)
        kl = dist.kl().mean() / batch[0].numel()
        return mse + 1e-4 * kl, {"mse": mse.detach()}

    train(step_fn, dict(vae.named_parameters()),
          TrainConfig(steps=cfg.vae_steps, lr=1e-3, warmup=50, schedule="cosine", seed=cfg.seed,
                      checkpoint_every=100, desc="vae"), checkpoint_dir=work / "vae", progress=progress)
    vae.eval()
    center_latents(vae, x[::max(1, len(x) // 1024)])  # every prompt's renders, not the first prompt's


def center_latents(vae, x: torch.Tensor) -> dict[str, list[float]]:
    """Fold the latents' per-channel mean into the VAE's own biases (exactly: the encoder's ``quant_conv`` gives
    the mean minus it, the decoder's ``post_quant_conv`` adds it back) and set ``scaling_factor`` to one over
    their std, as SD's is. Why: SD's noise schedule keeps 7% of the signal at t=999, so sampling starts from
    zero-mean noise and cannot reach latents whose channel means sit far from zero. The first toy VAE's sat at
    -1.3 to -1.6 (std 0.8), and every generation carried the same magenta cast. Returns the means removed."""
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
        mean = z.mean((0, 2, 3))
        c = len(mean)
        vae.quant_conv.bias[:c] -= mean  # the first c output channels are the posterior's mean
        vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ mean
    vae.register_to_config(scaling_factor=float(1.0 / (z - mean[None, :, None, None]).std()))
    return {"removed_mean": mean.tolist()}


def train_unet(pipe, latents: torch.Tensor, prompts: list[str], cfg: BuildConfig, work: Path, progress=True):
    unet, noise_sched = pipe.unet, toymodel.training_scheduler()
    unique = sorted(set(prompts)) + [""]
    with torch.no_grad():
        states = encode_prompts(pipe, unique)
    prompt_idx = torch.tensor([unique.index(p) for p in prompts])
    empty = len(unique) - 1
    unet.train()
    params = dict(unet.named_parameters())
    ema = {k: v.detach().clone() for k, v in params.items()} if cfg.ema else {}

    def average(step):
        decay = min(cfg.ema, (1 + step) / (10 + step))  # a short warm-up, so early weights do not linger
        with torch.no_grad():
            for k, v in ema.items():
                v.lerp_(params[k], 1 - decay)

    def step_fn(step, gen):
        idx = torch.randint(0, len(latents), (cfg.unet_batch,), generator=gen)
        which = prompt_idx[idx].clone()
        which[torch.rand(len(idx), generator=gen) < cfg.cfg_dropout] = empty  # classifier-free guidance
        return noise_prediction_loss(unet, noise_sched, latents[idx], states[which], generator=gen)

    train(step_fn, params, TrainConfig(steps=cfg.unet_steps, lr=cfg.unet_lr, warmup=100, schedule="cosine",
                                       seed=cfg.seed, checkpoint_every=100, desc="unet"),
          checkpoint_dir=work / "unet", progress=progress, on_step=average if ema else None, keep=ema)
    with torch.no_grad():
        for k, v in ema.items():
            params[k].copy_(v)
    unet.eval()


def save_pipeline(pipe, folder: Path) -> None:
    """Save as float16 (half the size; loading with torch_dtype=float32 upcasts) in diffusers' layout."""
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    pipe.to(torch.float32)


def build(out: Path, cfg: BuildConfig, stages: list[str], progress: bool = True) -> dict:
    out, work = Path(out), Path(out) / "_work"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    report = {"config": asdict(cfg)}
    pipe = toymodel.build_pipeline(toymodel.ToyModelConfig(text_dim=cfg.text_dim), seed=cfg.seed)
    if "text" in stages:
        t0 = time.time()
        report["text_statistics_before"] = text_statistics(pipe.tokenizer, pipe.text_encoder)
        report["text_statistics"] = pretrain_text_encoder(pipe.tokenizer, pipe.text_encoder, cfg.text_steps,
                                                          seed=cfg.seed, checkpoint_dir=work / "text",
                                                          progress=progress, spread_weight=cfg.text_spread,
                                                          span_weight=cfg.text_span_weight,
                                                          hinge_weight=cfg.text_hinge_weight)
        torch.save(pipe.text_encoder.state_dict(), work / "text_final.pt")
        report["text_s"] = round(time.time() - t0, 1)
    if "vae" in stages or "unet" in stages:
        t0 = time.time()
        x, prompts = render_training_set(cfg)
        report["render_s"] = round(time.time() - t0, 1)
    if "vae" in stages:
        t0 = time.time()
        train_vae(pipe.vae, x, cfg, work, progress)
        torch.save(pipe.vae.state_dict(), work / "vae_final.pt")
        with torch.no_grad():
            z = pipe.vae.encode(x[-256:]).latent_dist.mean
            report["vae_recon_mse"] = float(F.mse_loss(pipe.vae.decode(z).sample, x[-256:]))
        report["vae_s"] = round(time.time() - t0, 1)
    if "unet" in stages:
        t0 = time.time()
        pipe.text_encoder.load_state_dict(torch.load(work / "text_final.pt"))
        pipe.vae.load_state_dict(torch.load(work / "vae_final.pt"))
        pipe.vae.register_to_config(scaling_factor=_scaling_from(pipe.vae, x))
        latents = torch.cat([encode_images(pipe.vae, x[i:i + 256]) for i in range(0, len(x), 256)])
        train_unet(pipe, latents, prompts, cfg, work, progress)
        save_pipeline(pipe, out / "toy_sd")
        report["unet_s"] = round(time.time() - t0, 1)
    if "oracle" in stages:
        t0 = time.time()
        oracle = train_oracle(steps=cfg.oracle_steps, seed=cfg.seed, progress=progress)
        oracle.save(out / "toy_oracle")
        acc = held_out_accuracy(oracle)
        report["oracle_heldout_accuracy"] = acc
        report["oracle_s"] = round(time.time() - t0, 1)
    (out / f"build_report_{'_'.join(stages)}.json").write_text(json.dumps(report, indent=1))
    return report


def _scaling_from(vae, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(1.0 / vae.encode(x[::max(1, len(x) // 1024)]).latent_dist.mean.std())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ASSETS))
    ap.add_argument("--stage", action="append", choices=["text", "vae", "unet", "oracle"],
                    help="stages to run (repeatable); default all")
    for f, v in asdict(BuildConfig()).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(v) if not isinstance(v, bool) else int, default=v)
    args = ap.parse_args(argv)
    cfg = BuildConfig(**{f: getattr(args, f) for f in asdict(BuildConfig())})
    report = build(Path(args.out), cfg, args.stage or ["text", "vae", "unet", "oracle"])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
