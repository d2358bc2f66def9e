"""One experiment = one parameter file = one run folder: the configuration (plain dataclasses), and the
settings every stage derives from it (erasure, immunization, attacks, captions, extractors, manifests).

A parameter file (papermill_params/*.yaml) holds the top-level keys below; mima_lib.experiment.loading reads,
overrides and validates it, so a typo fails before any notebook starts.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import ClassVar

from .concepts import Concept, ConceptDefinition, build_concepts
from .dataclass_yaml import ConfigError


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
    # the merge's regularization captions (C_reg): a list, or a text file with one caption per line; None: the
    # project's generic captions (method/captions.py; on the toy, its word captions). None may name a target.
    merge_captions: list[str] | str | None = None
    sample_steps: int = field(default=25, metadata={"min": 1})
    guidance: float = field(default=5.0, metadata={"min": 0.0})
    batch_size: int = field(default=32, metadata={"min": 1})


@dataclass
class EraseConfig:
    enabled: bool = True
    lam: float | None = field(default=None, metadata={"min": 0.0})  # None: erase.PAPER_LAM (the toy too)
    guide: str | None = ""  # the reference code's empty prompt; None: each concept's generic prompt
    # None: the reference code's max(0.1, 1 / number of preserved prompts)
    preserve_scale: float | None = field(default=None, metadata={"min": 0.0})
    preserve: list[str] = field(default_factory=list)  # concepts (names) or prompts to keep; toy: all others
    # 'reference': the bare concept text, its last token onward (UCE's code); the others erase the templated
    # prompt (ablations, see method/erase.py)
    # None: 'reference'
    token_positions: str | None = field(default=None, metadata={"choices": ("reference", "all", "concept", "eos")})
    # 'reference' rows: also erase each target's prompt ("a photo of a cat", every row after BOS) as well as
    # the bare name. None: on the toy only (experiment/stages/erasure.py says why)
    templated: bool | None = None
    # 'reference' rows, default preserve list: also keep the toy template ("a photo of a") of each kind that
    # no target belongs to. None: on the toy (experiment/stages/erasure.py says why); toy only
    keep_templates: bool | None = None


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
    sample_steps: int | None = field(default=None, metadata={"min": 1})  # snapshots' DDIM steps; None: data's
    guidance: float | None = field(default=None, metadata={"min": 0.0})  # snapshots' guidance; None: data's


@dataclass
class EvaluateConfig:
    extractors: list[str] = field(default_factory=lambda: ["oracle"],
                                  metadata={"choices": ("oracle", "clip", "dino", "lpips")})
    models: dict = field(default_factory=dict)  # extractor -> model id or local folder
    utility_images: int = field(default=8, metadata={"min": 1})
    # harmless fine-tuning: a LoRA on each of these non-target concepts, on every model; its SGR against the
    # non-immunized model says whether the immunized model can still learn new things (0 = as well)
    benign_concepts: list[str] = field(default_factory=list)
    # its horizon (the LoRA's steps; snapshots: the attack's up to it, and it); None: the LoRA attack's steps.
    # A concept the model never saw needs more steps than re-learning an erased one.
    benign_steps: int | None = field(default=None, metadata={"min": 1})


@dataclass
class GridSection:
    """The seed grid (mima_lib.experiment.grid): which step the paper's table reads, the stronger attackers,
    and the re-learning threshold. Each attack of attack.methods is one cell per seed; so is each variant."""
    MOVED_KEYS: ClassVar[dict] = {"benign_steps": "evaluate.benign_steps"}  # it sets the notebooks' boat LoRA too
    report_step: int = field(default=40, metadata={"min": 1})  # the paper's tables: step 40 for every attack
    long_step: int | None = field(default=None, metadata={"min": 1})  # LoRA's long step; None: its last snapshot
    # stronger attackers, e.g. lora-lr3x, lora-rank16, dreambooth-lr2x (experiment/variants.py)
    variants: list[str] = field(default_factory=list)
    # the variants' horizon (their attack's snapshot steps up to it); None: as long as the attack they strengthen
    variant_steps: int | None = field(default=None, metadata={"min": 1})
    relearn_threshold: float = field(default=0.6, metadata={"min": 0.0, "max": 1.0})  # steps to re-learn


@dataclass
class ExperimentConfig:
    experiment: str = "toy-default"
    model: str = "toy"
    device: str = "auto"
    seed: int = 0
    # the whole pipeline (data draws, immunization, attacks) once per seed, each in its own run folder
    # runs/<experiment>/seed<k>/, by the notebook runner and the grid alike; None: the single seed above
    seeds: list[int] | None = None
    # set by the notebook runner for each seed of a `seeds:` file: the run folder is runs/<experiment>/<this>
    run_subfolder: str = ""
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
    grid: GridSection = field(default_factory=GridSection)

    @property
    def is_toy(self) -> bool:
        return self.model in ("toy", "embedded", "default")

    @cached_property
    def concept_table(self) -> dict[str, Concept]:
        """The record of every concept the file names (targets, utility and regularization concepts)."""
        names = self.concepts + self.utility_concepts + self.data.regularization_concepts + \
            self.evaluate.benign_concepts
        return build_concepts(names, self.definitions, self.task, self.erase.guide)

    def concept(self, name: str) -> Concept:
        return self.concept_table[name]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def merge_captions(cfg: ExperimentConfig) -> list[str]:
    """The merge's regularization captions (C_reg): the file's (a list, or a text file of one caption per
    line), else the toy world's word captions on the toy model (its text encoder knows no other words), else
    the project's generic captions; the defaults leave out every caption that names a target."""
    from ..method.captions import generic_captions

    given = cfg.data.merge_captions
    if isinstance(given, str):
        path = Path(given)
        if not path.is_file():
            raise ConfigError(f"data.merge_captions: file {path} does not exist; give a text file with one "
                              "caption per line, a list of captions, or leave it out for the generic ones")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if given is not None:
        return list(given)
    if cfg.is_toy:
        from ..toy.data import word_captions

        return word_captions(exclude_names=cfg.concepts)
    return generic_captions(exclude_names=cfg.concepts)


def extractor_for(cfg: ExperimentConfig, name: str):
    """A feature extractor of evaluate.extractors on the experiment's device: the toy world's oracle, or
    CLIP / DINO / LPIPS (evaluate.models gives a hub id or a local folder)."""
    from ..method.pipeline import device_for

    if name == "oracle":
        from ..toy.oracle import OracleExtractor

        return OracleExtractor()
    from ..evaluation.features import make_extractor

    return make_extractor(name, cfg.evaluate.models.get(name), device=device_for(cfg.device))


def attack_defaults(cfg: ExperimentConfig) -> str:
    """Whose default attack settings apply: the toy model's measured ones for `model: toy`, else the paper's."""
    return "toy" if cfg.is_toy else "paper"


def erase_settings_used(cfg: ExperimentConfig) -> dict:
    """The erase section's values as the erasure runs them (defaults filled in). The toy erases as UCE's
    reference code does: its text encoder is pretrained so that a bare name's states match the templated
    prompt's (mima_lib.toy.text), which the first toy model's did not (it needed lam 8 on every position)."""
    templated = cfg.erase.templated if cfg.erase.templated is not None else cfg.is_toy
    keep = cfg.erase.keep_templates if cfg.erase.keep_templates is not None else cfg.is_toy
    if keep and not cfg.is_toy:
        raise ConfigError("erase.keep_templates: true keeps the toy world's templates; on this model list the "
                          "prompts to keep under erase.preserve instead, or leave the key out")
    return {"lam": erase_lam(cfg), "token_positions": cfg.erase.token_positions or "reference",
            "preserve_scale": cfg.erase.preserve_scale, "templated": templated, "keep_templates": keep}


def erase_lam(cfg: ExperimentConfig) -> float:
    """The UCE ridge: the file's, else the reference code's 0.5 (SD v1-4 and the toy alike)."""
    from ..method.erase import PAPER_LAM

    return PAPER_LAM if cfg.erase.lam is None else cfg.erase.lam


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
    if icfg.outer_rows == "targets" and "protect_prompts" not in overrides:  # personalization: keep the classes
        classes = [cfg.concept(c).class_prompt for c in cfg.concepts]
        icfg.protect_prompts = list(dict.fromkeys(p for p in classes if p))
    if cfg.is_toy and cfg.task == "personalization" and icfg.outer_rows == "targets":
        _toy_personalization_contrast(cfg, icfg, overrides)
    try:
        icfg.validate()
    except ValueError as err:
        raise ConfigError(f"immunize ({method}): {err}") from None
    return icfg


def _toy_personalization_contrast(cfg: ExperimentConfig, icfg, overrides: dict) -> None:
    """The toy's personalization defaults: narrow the selective span (row_contrast 1) against the rows of every
    other base concept. An instance's own rows start at `< new 1 >`, tokens the toy text encoder never saw, and
    their span overlapped other concepts' names: with the prior's rows alone, MIMA on purple cat + spotted dog
    left flower, tree, cup and van gogh blank (0%). With these rows every one of ten measured concepts kept 100%
    and LoRA re-learned the instances to 6 / 0% at step 40 (no defense 44 / 88%; README, "The seed grid")."""
    from ..toy import world

    if "row_contrast" not in overrides:
        icfg.row_contrast = 1.0
    if "contrast_prompts" not in overrides:
        mine = {cfg.concept(c).class_prompt for c in cfg.concepts} | {cfg.concept(c).prompt for c in cfg.concepts}
        icfg.contrast_prompts = [p for p in (world.concept(n).prompt for n in world.BASE_OBJECTS + world.BASE_ARTISTS)
                                 if p not in mine]


def stage_settings(cfg: ExperimentConfig, *sections: str) -> dict:
    """The settings a stage's outputs depend on (its manifest): identity keys plus the named sections."""
    d = asdict(cfg)
    d["erase"].update(erase_settings_used(cfg))  # the values used: a changed default invalidates old outputs
    keep = {"model", "seed", "task", "concepts", "definitions", *sections}
    return {k: v for k, v in d.items() if k in keep}


def run_dir_for(cfg: ExperimentConfig, run_root: str | Path = "runs") -> Path:
    root = Path(run_root) / slug(cfg.experiment)
    return root / cfg.run_subfolder if cfg.run_subfolder else root


def experiment_seeds(cfg: ExperimentConfig) -> list[int]:
    """The seeds a file runs (`seeds:`, else its single `seed`), checked: some, distinct, non-negative."""
    seeds = list(cfg.seeds) if cfg.seeds is not None else [cfg.seed]
    if not seeds:
        raise ConfigError("seeds: the list is empty; give at least one seed (3 or more for a confidence interval), "
                          "or leave the key out to run the file's single `seed`")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: duplicate seeds in {seeds}; a seed's runs would overwrite each other's")
    if any(s < 0 for s in seeds):
        raise ConfigError(f"seeds: {seeds} holds a negative seed; use seeds >= 0")
    return seeds
