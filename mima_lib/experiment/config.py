"""One experiment = one parameter file = one run folder. Configuration and the paths every stage shares.

A parameter file (papermill_params/*.yaml) holds the top-level keys below; every notebook's `parameters`
cell receives the file's path and rebuilds the same validated ExperimentConfig from it, so a typo fails
before any notebook starts (`python -m mima_lib.experiment.run` loads it first).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from .concepts import Concept, ConceptDefinition, build_concepts
from .dataclass_yaml import ConfigError, from_dict, load_yaml


@dataclass
class DataConfig:
    immunization_images: int = field(default=20, metadata={"min": 1})
    attack_images: int = field(default=20, metadata={"min": 1})
    reference_images: int = field(default=20, metadata={"min": 1})
    regularization_images: int = field(default=200, metadata={"min": 0})
    regularization_prompt: str | None = None  # None: the concepts' generic prompts ("artwork", ...) by kind
    # other concepts whose own prompts join the regularization prompts (toy: keeps the prior from being only
    # the generic prompt, so immunization's damage stays on the targets; see README "default experiment")
    regularization_concepts: list[str] = field(default_factory=list)
    # toy world only: where immunization and attack images come from. 'model': the base model's generations
    # (the paper's re-learning data); 'render': the renderer's ground truth (the attacker holds real images)
    source: str = field(default="model", metadata={"choices": ("model", "render")})
    image_root: str | None = None  # real models: folder with one sub-folder of images per concept
    sample_steps: int = field(default=25, metadata={"min": 1})
    guidance: float = field(default=5.0, metadata={"min": 0.0})
    batch_size: int = field(default=32, metadata={"min": 1})


@dataclass
class EraseConfig:
    enabled: bool = True
    lam: float | None = field(default=None, metadata={"min": 0.0})  # None: erase.PAPER_LAM, or TOY_LAM on the toy
    guide: str | None = ""  # the reference code's empty prompt; None: "artwork" / "a photo of an object" by kind
    preserve_scale: float = field(default=1.0, metadata={"min": 0.0})
    preserve: list[str] = field(default_factory=list)  # extra concepts to preserve (toy: all others by default)
    token_positions: str = field(default="all", metadata={"choices": ("all", "concept", "eos")})  # see erase.py


@dataclass
class ImmunizeSection:
    methods: list[str] = field(default_factory=lambda: ["mima", "imma-sequential", "imma-joint"],
                               metadata={"choices": ("mima", "imma", "imma-sequential", "imma-joint")})
    settings: dict = field(default_factory=dict)  # fields of immunize.ImmunizeConfig, shared by all methods
    per_method: dict = field(default_factory=dict)  # method -> overrides of settings


@dataclass
class AttackSection:
    methods: list[str] = field(default_factory=lambda: ["lora"],
                               metadata={"choices": ("lora", "dreambooth", "textual_inversion", "custom_diffusion")})
    settings: dict = field(default_factory=dict)  # method -> fields of that attack's settings dataclass
    snapshot_steps: list[int] | None = None  # None: the method's default (10..40, plus 100/200/400 for LoRA)
    n_images: int = field(default=8, metadata={"min": 1})  # generations per snapshot and concept
    seeds: list[int] = field(default_factory=lambda: [0])  # attack seeds: the table's confidence interval


@dataclass
class EvaluateConfig:
    extractors: list[str] = field(default_factory=lambda: ["oracle"],
                                  metadata={"choices": ("oracle", "clip", "dino", "lpips")})
    models: dict = field(default_factory=dict)  # extractor -> model id or local folder
    utility_images: int = field(default=8, metadata={"min": 1})


@dataclass
class ExperimentConfig:
    experiment: str = "toy-default"
    model: str = "toy"
    device: str = "auto"
    seed: int = 0
    task: str = field(default="relearning", metadata={"choices": ("relearning", "personalization")})
    concepts: list[str] = field(default_factory=lambda: ["van gogh", "claude monet", "cat", "umbrella"])
    # concepts the toy world does not know (every concept of a real model): kind and prompts (concepts.py)
    definitions: dict[str, ConceptDefinition] = field(default_factory=dict)
    utility_concepts: list[str] = field(default_factory=list)  # non-targets whose quality must survive
    data: DataConfig = field(default_factory=DataConfig)
    erase: EraseConfig = field(default_factory=EraseConfig)
    immunize: ImmunizeSection = field(default_factory=ImmunizeSection)
    attack: AttackSection = field(default_factory=AttackSection)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    @property
    def is_toy(self) -> bool:
        return self.model in ("toy", "embedded", "default")

    @cached_property
    def concept_table(self) -> dict[str, Concept]:
        """The record of every concept the file names (targets, utility and regularization concepts)."""
        names = self.concepts + self.utility_concepts + self.data.regularization_concepts
        return build_concepts(names, self.definitions, self.task, self.erase.guide)

    def concept(self, name: str) -> Concept:
        return self.concept_table[name]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Checks that need more than types: concepts known, folders present, devices available."""
    from ..method.pipeline import device_for, looks_like_path

    if not cfg.concepts:
        raise ConfigError("concepts: the list is empty; name at least one concept to immunize")
    if len(set(cfg.concepts)) != len(cfg.concepts):
        raise ConfigError(f"concepts: duplicate names in {cfg.concepts}")
    clash = sorted(set(cfg.data.regularization_concepts) & set(cfg.concepts))
    if clash:
        raise ConfigError(f"data.regularization_concepts: {clash} are also targets; the prior would undo "
                          "their immunization: remove them from one of the two lists")
    if cfg.data.source == "render" and not cfg.is_toy:
        raise ConfigError("data.source: 'render' exists only for the toy world; a real model uses 'model' "
                          "or data.image_root")
    unused = sorted(set(cfg.definitions) - set(cfg.concept_table) - set(cfg.erase.preserve))
    if unused:
        raise ConfigError(f"definitions: {unused} are not named in concepts, utility_concepts, "
                          "data.regularization_concepts or erase.preserve; remove them or name them there")
    table = cfg.concept_table  # builds every record: unknown concepts and bad definitions fail here
    if cfg.data.image_root is not None:
        root = Path(cfg.data.image_root).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.image_root: folder {root} does not exist")
        for name in cfg.concepts:
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
    if cfg.task == "personalization" and cfg.erase.enabled and cfg.erase.preserve:
        raise ConfigError("erase: personalization concepts are new; set erase.enabled: false")
    try:
        device_for(cfg.device)
    except RuntimeError as err:
        raise ConfigError(f"device: {err}") from None
    _validate_method_settings(cfg)
    return cfg


def erase_lam(cfg: ExperimentConfig) -> float:
    """The UCE ridge: the file's, else the paper's 0.5 on a real model and the toy's measured value."""
    from ..method.erase import PAPER_LAM, TOY_LAM

    if cfg.erase.lam is not None:
        return cfg.erase.lam
    return TOY_LAM if cfg.is_toy else PAPER_LAM


def immunize_config(cfg: ExperimentConfig, method: str):
    """The ImmunizeConfig of one method: toy or paper defaults, then the file's settings."""
    from ..method.immunize import ImmunizeConfig

    overrides = {**cfg.immunize.settings, **cfg.immunize.per_method.get(method, {}), "method": method}
    overrides.setdefault("seed", cfg.seed)
    known = set(ImmunizeConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"immunize.settings: unknown keys {unknown}; known: {sorted(known)}")
    icfg = ImmunizeConfig.toy(**overrides) if cfg.is_toy else ImmunizeConfig(**overrides)
    try:
        icfg.validate()
    except ValueError as err:
        raise ConfigError(f"immunize ({method}): {err}") from None
    return icfg


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
            make_settings(method, cfg.attack.settings.get(method), "toy" if cfg.is_toy else "paper")
        except (ValueError, TypeError) as err:
            raise ConfigError(f"attack.settings.{method}: {err}") from None


def stage_settings(cfg: ExperimentConfig, *sections: str) -> dict:
    """The settings a stage's outputs depend on (its manifest): identity keys plus the named sections."""
    d = asdict(cfg)
    d["erase"]["lam"] = erase_lam(cfg)  # the value used, so a changed default invalidates old outputs
    keep = {"model", "seed", "task", "concepts", "definitions", *sections}
    return {k: v for k, v in d.items() if k in keep}


def load_experiment(params_file: str | Path) -> ExperimentConfig:
    data = load_yaml(params_file)
    try:
        return validate(from_dict(ExperimentConfig, data))
    except ConfigError as err:
        raise ConfigError(f"{params_file}: {err}") from None


def run_dir_for(cfg: ExperimentConfig, run_root: str | Path = "runs") -> Path:
    return Path(run_root) / slug(cfg.experiment)
