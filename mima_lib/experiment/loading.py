"""Reading a parameter file: overrides (``--set KEY.PATH=VALUE``), relative paths made absolute against the
file's own folder, and validation of everything that can be checked before anything runs (concepts, folders,
devices, each method's settings, merge captions, feature extractors). Every error names the key and the fix.

Every notebook's `parameters` cell receives the runner's effective file (runs/<experiment>/params.yaml) and
rebuilds the same validated ExperimentConfig from it with :func:`load_experiment`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from .config import (ExperimentConfig, attack_defaults, experiment_seeds, extractor_for, immunize_config,
                     merge_captions, slug)
from .dataclass_yaml import ConfigError, from_dict, load_yaml


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Checks that need more than types: concepts known, folders present, devices available."""
    from ..method.captions import captions_naming
    from ..method.pipeline import device_for, looks_like_path

    if not cfg.concepts:
        raise ConfigError("concepts: the list is empty; name at least one concept to immunize")
    experiment_seeds(cfg)  # some, distinct, non-negative
    if not re.fullmatch(r"[A-Za-z0-9_-]*", cfg.run_subfolder):
        raise ConfigError(f"run_subfolder: {cfg.run_subfolder!r} must be one folder name (letters, digits, _ -); "
                          "the runner sets it per seed, leave it out")
    if len(set(cfg.concepts)) != len(cfg.concepts):
        raise ConfigError(f"concepts: duplicate names in {cfg.concepts}")
    clash = sorted(set(cfg.data.regularization_concepts) & set(cfg.concepts))
    if clash:
        raise ConfigError(f"data.regularization_concepts: {clash} are also targets; the prior would undo "
                          "their immunization: remove them from one of the two lists")
    clash = sorted(set(cfg.evaluate.benign_concepts) & set(cfg.concepts))
    if clash:
        raise ConfigError(f"evaluate.benign_concepts: {clash} are targets; harmless fine-tuning needs concepts "
                          "that were not immunized against")
    if cfg.data.source == "render" and not cfg.is_toy:
        raise ConfigError("data.source: 'render' exists only for the toy world; a real model uses 'model' "
                          "or data.image_root")
    table = cfg.concept_table  # builds every record: unknown concepts and bad definitions fail here
    if cfg.data.image_root is not None:
        root = Path(cfg.data.image_root).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.image_root: folder {root} does not exist")
        for name in cfg.concepts + cfg.evaluate.benign_concepts:
            if not (root / slug(name)).is_dir():
                raise ConfigError(f"data.image_root: no image folder {root / slug(name)} for concept {name!r}")
    elif cfg.task == "personalization":
        new = [n for n in cfg.concepts if not table[n].toy]
        if not cfg.is_toy or new:
            raise ConfigError(f"data.image_root: personalization needs the concepts' own images "
                              f"({new or cfg.concepts} cannot be rendered); set data.image_root to a folder with "
                              "one sub-folder per concept")
    if "textual_inversion" in cfg.attack.methods and cfg.task == "relearning":
        missing = [n for n in cfg.concepts if table[n].ti_prompt is None]
        if missing:
            raise ConfigError(f"definitions: no place for Textual Inversion's placeholder in the prompts of "
                              f"{missing} (the concept's name does not occur in its prompt); give each a "
                              "ti_prompt, e.g. 'an artwork of <new1>'")
    if not cfg.is_toy and looks_like_path(cfg.model) and not Path(cfg.model).expanduser().exists():
        raise ConfigError(f"model: path {cfg.model} does not exist")
    captions = merge_captions(cfg)
    if not captions and "mima" in cfg.immunize.methods:
        raise ConfigError("data.merge_captions: no captions; the merge needs regularization captions")
    naming = captions_naming(captions, cfg.concepts)
    if naming:
        raise ConfigError(f"data.merge_captions: {len(naming)} caption(s) name a target, e.g. {naming[0]!r}; the "
                          "merge would keep what immunization removes: remove them")
    if cfg.task == "personalization" and cfg.erase.enabled and cfg.erase.preserve:
        raise ConfigError("erase: personalization concepts are new; set erase.enabled: false")
    try:
        device_for(cfg.device)
    except RuntimeError as err:
        raise ConfigError(f"device: {err}") from None
    _validate_method_settings(cfg)
    _try_extractors(cfg)
    return cfg


def _try_extractors(cfg: ExperimentConfig) -> None:
    """Build every feature extractor the report needs and embed two tiny images, now, not after hours."""
    from PIL import Image

    probe = [Image.new("RGB", (32, 32), (128, 64, 32)), Image.new("RGB", (32, 32), (10, 200, 90))]
    for name in cfg.evaluate.extractors:
        try:
            extractor_for(cfg, name).similarity(probe, probe)
        except (ImportError, OSError, RuntimeError, ValueError) as err:
            raise ConfigError(f"evaluate.extractors: {name!r} cannot be built here ({err}); fix it or leave "
                              f"{name!r} out of evaluate.extractors") from None


def _validate_method_settings(cfg: ExperimentConfig) -> None:
    """The immunize and attack sections hold each method's own settings: check them now, not mid-run."""
    from ..attacks import make_settings

    for method in cfg.immunize.methods:
        immunize_config(cfg, method)
    unknown = sorted(set(cfg.immunize.per_method) - set(cfg.immunize.methods))
    if unknown:
        raise ConfigError(f"immunize.per_method: {unknown} are not in immunize.methods {cfg.immunize.methods}")
    unknown = sorted(set(cfg.attack.settings) - set(cfg.attack.methods))
    if unknown:
        raise ConfigError(f"attack.settings: {unknown} are not in attack.methods {cfg.attack.methods}")
    for method in cfg.attack.methods:
        try:
            make_settings(method, cfg.attack.settings.get(method), attack_defaults(cfg))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"attack.settings.{method}: {err}") from None


def apply_overrides(data: dict, overrides=()) -> dict:
    """``KEY.PATH=VALUE`` settings (the runner's ``--set``) written into the parameter file's mapping; VALUE
    is read as YAML (3, 1e-5, [0, 1], true, text). The result is validated like the file."""
    data = json.loads(json.dumps(data))  # a deep copy of plain data
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: write KEY.PATH=VALUE, e.g. --set attack.settings.lora.steps=3")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err})") from None
        node, parts = data, key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is {child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def _resolve_paths(data: dict, base: Path) -> dict:
    """Relative paths of the file, read against the file's own folder (the notebooks run elsewhere)."""
    from ..method.pipeline import looks_like_path

    def resolve(value, always: bool):
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            return value
        local = base / value
        if always or local.exists() or (looks_like_path(value) and value.startswith(".")):
            return str(local.resolve())
        return value  # a hub id such as CompVis/stable-diffusion-v1-4

    if data.get("model") not in (None, "toy", "embedded", "default"):
        data["model"] = resolve(data["model"], always=False)
    section = data.get("data")
    if isinstance(section, dict):
        if "image_root" in section:
            section["image_root"] = resolve(section["image_root"], always=True)
        if isinstance(section.get("merge_captions"), str):
            section["merge_captions"] = resolve(section["merge_captions"], always=True)
    models = (data.get("evaluate") or {}).get("models") if isinstance(data.get("evaluate"), dict) else None
    if isinstance(models, dict):
        for k, v in models.items():
            models[k] = resolve(v, always=False)
    return data


def effective_parameters(params_file: str | Path, overrides=()) -> dict:
    """The parameter file's mapping with the overrides applied and its relative paths made absolute."""
    params_file = Path(params_file)
    data = apply_overrides(load_yaml(params_file), overrides)
    return _resolve_paths(data, params_file.resolve().parent)


def load_experiment(params_file: str | Path, overrides=()) -> ExperimentConfig:
    """Read, override (``KEY.PATH=VALUE``), resolve and validate a parameter file: every error names the key
    and the fix, before anything runs."""
    try:
        data = effective_parameters(params_file, overrides)
        return validate(from_dict(ExperimentConfig, data))
    except ConfigError as err:
        raise ConfigError(f"{params_file}: {err}") from None


def load_run(params_file: str | Path, overrides=()) -> ExperimentConfig:
    """The experiment one notebook runs: the file's own, or for a `seeds:` file opened by hand (the runner
    gives each seed its own file) its first seed, in the folder the runner uses for it (runs/<experiment>/seed<k>/),
    so a notebook run in JupyterLab finds what `make demo` computed."""
    from dataclasses import replace

    cfg = load_experiment(params_file, overrides)
    if cfg.seeds is None:
        return cfg
    s = cfg.seeds[0]
    return replace(cfg, seed=s, seeds=None, run_subfolder=f"seed{s}", attack=replace(cfg.attack, seeds=[s]))
