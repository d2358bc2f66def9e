"""Adaptation attacks: fine-tuning that tries to (re-)learn a concept on a (possibly immunized) model.

Four methods, one file each, all on the same loop (`common.finetune_concepts` -> `training.train`):

    lora               LoRA adapters on the UNet's attention (peft); diffusers LoRA format
    dreambooth         full-UNet fine-tuning, optional prior preservation; a full pipeline folder
    textual_inversion  one new token's embedding; diffusers learned_embeds.safetensors
    custom_diffusion   attn2 K/V (+ Q/out) and modifier tokens, single or multi-concept; diffusers format

Two settings (see `mima_lib.attack_data`): re-learning (an erased concept under its original prompt,
"a photo of a cat") and personalization (a new instance with a modifier token, "a photo of <new1> cat").

Every attack changes the pipeline it is given, in place, and returns an `AttackResult` with the same
pipeline, the losses and snapshot generations at fixed seeds. Attack a copy (`copy_pipeline(pipe)` or
`run_attack(..., copy=True)`) to keep the original. Settings dataclasses default to the paper's SD v1-4
values; `.toy()` gives the values measured on the embedded toy model.

    result = run_attack("lora", pipe, images, "a photo of a cat", {"steps": 200}, copy=True)
    save_attack(result, "runs/lora_cat");  load_attack("lora", other_pipe, "runs/lora_cat")
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from .common import (DEFAULT_SNAPSHOT_STEPS, LORA_SNAPSHOT_STEPS, AttackResult, copy_pipeline, finetune,
                     finetune_concepts, generate_class_images, validate_images)
from .custom_diffusion import (CustomDiffusionSettings, custom_diffusion_attack, custom_diffusion_multi_attack,
                               load_custom_diffusion, save_custom_diffusion)
from .dreambooth import DreamBoothSettings, dreambooth_attack, load_dreambooth, save_dreambooth
from .lora import LoraSettings, load_lora, lora_attack, save_lora
from .textual_inversion import (TextualInversionSettings, load_textual_inversion, save_textual_inversion,
                                textual_inversion_attack)


@dataclass(frozen=True)
class AttackMethod:
    """One registry entry: its settings class, the attack function, and how its result is saved/loaded."""

    name: str
    settings: type
    attack: Callable
    save: Callable  # save(result, folder)
    load: Callable  # load(pipe, folder) -> pipe (DreamBooth: returns a freshly loaded pipeline)

    def __call__(self, pipe, images, prompt, settings=None, **finetune_kwargs) -> AttackResult:
        return self.attack(pipe, images, prompt, settings, **finetune_kwargs)


ATTACKS: dict[str, AttackMethod] = {
    "lora": AttackMethod(
        "lora", LoraSettings, lora_attack,
        save=lambda r, folder: save_lora(r.pipe, folder, r.settings.adapter_name),
        load=lambda pipe, folder: load_lora(pipe, folder)),
    "dreambooth": AttackMethod(
        "dreambooth", DreamBoothSettings, dreambooth_attack,
        save=lambda r, folder: save_dreambooth(r.pipe, folder),
        load=lambda pipe, folder: load_dreambooth(folder, device=str(pipe.device))),
    "textual_inversion": AttackMethod(
        "textual_inversion", TextualInversionSettings, textual_inversion_attack,
        save=lambda r, folder: save_textual_inversion(r.pipe, folder, r.settings.token),
        load=lambda pipe, folder: load_textual_inversion(pipe, folder)),
    "custom_diffusion": AttackMethod(
        "custom_diffusion", CustomDiffusionSettings, custom_diffusion_attack,
        save=lambda r, folder: save_custom_diffusion(r.pipe, folder, r.tokens, r.settings.train_q_out),
        load=lambda pipe, folder: load_custom_diffusion(pipe, folder)),
}


def _method(name: str) -> AttackMethod:
    key = str(name).lower().replace("-", "_").replace(" ", "_")
    aliases = {"ti": "textual_inversion", "db": "dreambooth", "cd": "custom_diffusion"}
    key = aliases.get(key, key)
    if key not in ATTACKS:
        raise KeyError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    return ATTACKS[key]


def make_settings(method: str, settings=None, defaults: str = "paper"):
    """Settings for `method`: a settings object is returned as is; a dict overrides the paper's or the
    toy model's defaults (defaults='paper' | 'toy'); unknown keys fail and list the valid ones."""
    m = _method(method)
    if isinstance(settings, m.settings):
        return settings
    if settings is not None and not isinstance(settings, dict):
        raise TypeError(f"settings for {m.name} must be a dict or {m.settings.__name__}, "
                        f"got {type(settings).__name__}")
    if defaults not in ("paper", "toy"):
        raise ValueError(f"defaults must be 'paper' or 'toy', got {defaults!r}")
    overrides = dict(settings or {})
    valid = [f.name for f in fields(m.settings)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown {m.name} settings {unknown}; valid: {valid}")
    for k in ("snapshot_steps", "target_modules"):
        if isinstance(overrides.get(k), list):
            overrides[k] = tuple(overrides[k])
    if isinstance(overrides.get("modifier_token"), list):
        overrides["modifier_token"] = tuple(overrides["modifier_token"])
    return getattr(m.settings, defaults)(**overrides)


def run_attack(method: str, pipe, images, prompt: str, settings=None, *, defaults: str = "paper",
               copy: bool = False, **finetune_kwargs) -> AttackResult:
    """Run one attack by name. settings: None, a dict of overrides, or the method's settings object, over the
    paper's defaults or (defaults='toy') the values measured on the embedded toy model: the caller says which,
    as a parameter file does with `model:`. copy=True attacks a deep copy and leaves `pipe` untouched
    (result.pipe is the adapted copy); otherwise pipe changes in place."""
    m = _method(method)
    s = make_settings(m.name, settings, defaults)
    target = copy_pipeline(pipe) if copy else pipe
    return m.attack(target, images, prompt, s, **finetune_kwargs)


def save_attack(result: AttackResult, folder):
    """Save what an attack learned in its method's format (see each method's save_*)."""
    return _method(result.method).save(result, folder)


def load_attack(method: str, pipe, folder):
    """Load a saved attack into pipe (in place; DreamBooth returns the loaded pipeline instead)."""
    return _method(method).load(pipe, folder)


__all__ = [
    "ATTACKS", "AttackMethod", "AttackResult", "run_attack", "make_settings", "save_attack", "load_attack",
    "copy_pipeline", "finetune", "finetune_concepts", "validate_images", "generate_class_images",
    "DEFAULT_SNAPSHOT_STEPS", "LORA_SNAPSHOT_STEPS",
    "LoraSettings", "lora_attack", "save_lora", "load_lora",
    "DreamBoothSettings", "dreambooth_attack", "save_dreambooth", "load_dreambooth",
    "TextualInversionSettings", "textual_inversion_attack", "save_textual_inversion", "load_textual_inversion",
    "CustomDiffusionSettings", "custom_diffusion_attack", "custom_diffusion_multi_attack",
    "save_custom_diffusion", "load_custom_diffusion",
]
