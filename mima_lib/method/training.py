"""The one training loop: toy-model training, every attack and every immunizer call `train`.

A caller supplies the parameters to update (by name) and a `step_fn(step, generator)` that returns the
loss to *minimise* (immunizers return minus the loss they ascend). If the returned loss does not require
grad, step_fn has filled the parameters' .grad itself (the exact MIMA hypergradient does this).

The loop owns: the optimizer and learning-rate schedule, gradient clipping, a seeded generator for all
sampling, a tqdm bar with the losses, and checkpoints every `checkpoint_every` steps from which an
interrupted run resumes bit for bit (parameters, optimizer, generator and torch RNG state).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm


@dataclass
class TrainConfig:
    steps: int
    lr: float
    optimizer: str = "adamw"  # 'adamw' | 'sgd'
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "constant"  # 'constant' | 'cosine'
    clip_grad: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 0  # 0: never
    desc: str = "train"


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    extras: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def make_optimizer(params: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use 'adamw' or 'sgd'")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint behind


def save_checkpoint(path: Path, step: int, params: dict[str, torch.Tensor], opt, gen: torch.Generator,
                    result: TrainResult, keep: dict[str, torch.Tensor] | None = None) -> None:
    _atomic_save({"step": step, "params": {k: v.detach().clone() for k, v in params.items()},
                  "keep": {k: v.detach().clone() for k, v in (keep or {}).items()},
                  "optimizer": opt.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                  "losses": result.losses, "extras": result.extras}, path)


def load_checkpoint(path: Path, params: dict[str, torch.Tensor], opt, gen: torch.Generator,
                    keep: dict[str, torch.Tensor] | None = None) -> tuple[int, dict]:
    state = torch.load(path, weights_only=False)
    missing = (set(params) - set(state["params"])) | (set(keep or {}) - set(state.get("keep", {})))
    if missing:
        raise ValueError(f"checkpoint {path} does not match this run (missing {sorted(missing)[:3]}...); "
                         "delete it or use another checkpoint folder")
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(state["params"][k])
        for k, v in (keep or {}).items():
            v.copy_(state["keep"][k])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state


def train(step_fn: Callable[[int, torch.Generator], torch.Tensor | tuple[torch.Tensor, dict]],
          params: dict[str, torch.Tensor], cfg: TrainConfig, checkpoint_dir: str | Path | None = None,
          progress: bool = True, on_step: Callable[[int], None] | None = None,
          keep: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """Run cfg.steps optimisation steps of step_fn over params; resume from checkpoint_dir if one is there.

    step_fn may return (loss, extras) where extras is a dict of floats shown on the bar and logged.
    on_step(step) runs after each update with the 1-based step count (for snapshots at chosen steps).
    keep: more tensors the caller updates itself (an EMA copy of the weights), saved with every checkpoint
    and restored on resume.
    """
    if cfg.steps < 0:
        raise ValueError("steps must be >= 0")
    plist = list(params.values())
    if not plist:
        raise ValueError("train: no parameters to update")
    opt = make_optimizer(plist, cfg)
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    result, start = TrainResult(), 0
    ckpt = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir else None
    if ckpt is not None:
        ckpt.with_suffix(ckpt.suffix + ".tmp").unlink(missing_ok=True)  # a save cut short by a kill: never valid
    if ckpt is not None and ckpt.exists():
        start, state = load_checkpoint(ckpt, params, opt, gen, keep)
        result = TrainResult(list(state["losses"]), list(state["extras"]), resumed_from=start)
    bar = tqdm(range(start, cfg.steps), desc=cfg.desc, initial=start, total=cfg.steps, disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        opt.zero_grad(set_to_none=True)
        out = step_fn(step, gen)
        loss, extras = out if isinstance(out, tuple) else (out, {})
        if loss.requires_grad:
            loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(plist, cfg.clip_grad)
        opt.step()
        result.losses.append(float(loss.detach()))
        result.extras.append({k: float(v) for k, v in extras.items()})
        bar.set_postfix(loss=f"{result.losses[-1]:.4f}", **{k: f"{float(v):.4f}" for k, v in extras.items()})
        if on_step is not None:
            on_step(step + 1)
        if ckpt is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ckpt, step + 1, params, opt, gen, result, keep)
    return result
