"""The cells of the seed grid: what one seed computes, each cell an artifact with a manifest.

    runs/<experiment>/seed<k>/                         one seed's own run folder (data, erased, immunized,
                                                       attacks/<model>/<concept>/<cell>/seed<k>/): the stages
    runs/<experiment>/cells/seed<k>/<cell>/            one cell: cell.json (the evaluated numbers), a grid
                                                       of snapshots, and manifest.json, written last

A cell is an attack column (experiment/variants.py) on every model and target, the harmless fine-tune
(`benign-lora`), or `utility` (non-target concepts before and after immunization). Seeds share no file, so a
kill during one seed cannot corrupt another. A cell with a manifest of the same settings is skipped; the
report (grid_report.py) reads only cell.json files.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from ..attacks import run_attack
from ..evaluation.metrics import similarity_curve
from ..evaluation.plots import method_step_grid
from ..method.diffusion import generate
from ..method.tensor_io import atomic_write_text, load_tensors, save_tensors
from . import stages
from .artifacts import check_manifest, remove_stale_temporaries, write_manifest
from .config import ExperimentConfig, attack_defaults, extractor_for, slug, stage_settings
from .stages.attack import attack_prompt, sampling
from .stages.common import BASELINE, base_pipeline, log, model_for, models_of
from .variants import BENIGN, AttackCell, cell_settings

BASE = "base"  # the published model, before erasure: utility and harmless fine-tuning start from it too
CELL_FILE = "cell.json"


def seed_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The experiment of one seed: its data draws, immunization seed and attack seed are `seed`."""
    return replace(cfg, seed=seed, seeds=None, attack=replace(cfg.attack, seeds=[seed]))


def seed_dir(root: Path, seed: int) -> Path:
    return Path(root) / f"seed{seed}"


def cell_dir(root: Path, seed: int, cell: str) -> Path:
    return Path(root) / "cells" / f"seed{seed}" / slug(cell)


def prepare(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Stages 01-03 of one seed into its own folder (each resumes by its own manifest)."""
    stages.make_data(cfg, run_dir)
    stages.erase(cfg, run_dir)
    stages.immunize(cfg, run_dir)


def record_prepare(root: Path, seed: int, seconds: float) -> None:
    """How long stages 01-03 of a seed took when they first finished (later runs only reload them)."""
    path = Path(root) / "cells" / f"seed{seed}" / "prepare.json"
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"seconds": round(seconds, 2)}))


def _erased(cfg: ExperimentConfig) -> bool:
    return cfg.task == "relearning" and cfg.erase.enabled


def _pipe(cfg: ExperimentConfig, run_dir: Path, model: str):
    return base_pipeline(cfg) if model == BASE else model_for(cfg, run_dir, model)


def _base_settings(cfg: ExperimentConfig) -> dict:
    return stage_settings(cfg, "erase", "data", "immunize", "evaluate")


def cell_done(folder: Path, settings: dict) -> bool:
    """True if this cell finished with these settings (its manifest); other settings fail (ManifestMismatch)."""
    return check_manifest(folder, settings) and (Path(folder) / CELL_FILE).exists()


def _finish(folder: Path, payload: dict, settings: dict, seed: int, t0: float) -> dict:
    payload["seconds"] = round(time.time() - t0, 2)
    atomic_write_text(folder / CELL_FILE, json.dumps(payload, indent=1, sort_keys=True))
    write_manifest(folder, settings, seed)
    return payload


# ---------------------------------------------------------------- attack cells
def attack_cell_settings(cfg: ExperimentConfig, cell: AttackCell) -> dict:
    return {**_base_settings(cfg), "cell": cell.name, "attack": cell.attack,
            "attack_settings": cell_settings(cfg, cell, cfg.seed), "n_images": cfg.attack.n_images,
            **sampling(cfg)}


def cell_models(cfg: ExperimentConfig, benign: bool) -> list[str]:
    """The models a cell attacks: no defense and each method; the harmless fine-tune also the base model."""
    return ([BASE] if benign and _erased(cfg) else []) + models_of(cfg)


def clear_cell_runs(run_dir, cell_name: str, seed: int) -> None:
    """Remove a cell's attack runs (every model and concept), checkpoints included: a forced cell starts anew
    instead of meeting the manifests of runs made with other settings."""
    import shutil

    for folder in (Path(run_dir) / "attacks").glob(f"*/*/{slug(cell_name)}/seed{seed}"):
        shutil.rmtree(folder)


def _one_run(cfg, run_dir, data, pipe, model, concept, cell, settings) -> dict:
    """One attack run (model x concept) of a cell, resumable by its own manifest; {step: images}."""
    folder = Path(run_dir) / "attacks" / slug(model) / slug(concept) / slug(cell.name) / f"seed{cfg.seed}"
    run_settings = {**settings, "model": model, "concept": concept}
    if not check_manifest(folder, run_settings):
        remove_stale_temporaries(folder)
        log(f"seed {cfg.seed}: {cell.name} on {model!r} for {concept!r}")
        prompt = attack_prompt(cfg, concept, cell.attack)
        n = cfg.attack.n_images
        result = run_attack(cell.attack, pipe, data.images[concept]["attack"], prompt, settings["attack_settings"],
                            defaults=attack_defaults(cfg), copy=True, snapshot_prompts=[prompt] * n,
                            snapshot_seeds=list(range(n)), progress=False, checkpoint_dir=folder / "checkpoint",
                            **sampling(cfg))
        save_tensors({str(k): v for k, v in result.snapshots.items()}, folder / "snapshots.safetensors")
        atomic_write_text(folder / "losses.json", json.dumps({"losses": result.losses, "prompt": prompt}))
        write_manifest(folder, run_settings, cfg.seed)
    return {int(k): v for k, v in load_tensors(folder / "snapshots.safetensors").items()}


def run_attack_cell(cfg: ExperimentConfig, run_dir: Path, folder: Path, cell: AttackCell,
                    concepts: list[str] | None = None, settings: dict | None = None) -> dict:
    """Attack every model on every concept with this cell's attack; evaluate every snapshot: the oracle's
    accuracy (toy world) and the similarity M to the references under each extractor. settings: the cell's
    manifest settings (default: attack_cell_settings)."""
    t0 = time.time()
    benign = concepts is not None
    concepts = list(cfg.concepts if concepts is None else concepts)
    settings = attack_cell_settings(cfg, cell) if settings is None else settings
    data = stages.load_data(cfg, run_dir)
    extractors = {name: extractor_for(cfg, name) for name in cfg.evaluate.extractors}
    oracle = None
    if cfg.is_toy and all(cfg.concept(c).toy for c in concepts):
        from ..toy.oracle import load_toy_oracle

        oracle = load_toy_oracle()
    results: dict = {}
    snaps_first: dict = {}
    for model in cell_models(cfg, benign):
        pipe = _pipe(cfg, run_dir, model)  # loaded once per model; every run attacks a copy
        for concept in concepts:
            snaps = _one_run(cfg, run_dir, data, pipe, model, concept, cell, settings)
            entry = {"M": {name: {str(k): v for k, v in similarity_curve(data.images[concept]["reference"], snaps,
                                                                         ex).items()}
                           for name, ex in extractors.items()}}
            if oracle is not None:
                entry["accuracy"] = {str(step): oracle.accuracy(snaps[step], concept) for step in sorted(snaps)}
            results.setdefault(model, {})[concept] = entry
            if concept == concepts[0]:
                snaps_first[model] = snaps
    folder.mkdir(parents=True, exist_ok=True)
    method_step_grid(snaps_first, path=folder / "grid.png")
    payload = {"kind": "benign" if benign else "attack", "cell": cell.name, "attack": cell.attack,
               "lr_scale": cell.lr_scale, "rank": cell.rank, "seed": cfg.seed, "concepts": concepts,
               "models": list(results), "results": results,
               "steps": sorted(int(s) for s in next(iter(snaps_first.values())))}
    return _finish(folder, payload, settings, cfg.seed, t0)


def benign_cell() -> AttackCell:
    return AttackCell(BENIGN, "lora")


def benign_cell_settings(cfg: ExperimentConfig) -> dict:
    return {**attack_cell_settings(cfg, benign_cell()), "benign_concepts": list(cfg.evaluate.benign_concepts)}


def run_benign_cell(cfg: ExperimentConfig, run_dir: Path, folder: Path) -> dict:
    return run_attack_cell(cfg, run_dir, folder, benign_cell(), cfg.evaluate.benign_concepts,
                           benign_cell_settings(cfg))


# ---------------------------------------------------------------- utility
def family(kind: str) -> str:
    """Objects and instances (an instance is an object of its class) vs artists."""
    return "artist" if kind == "artist" else "object"


def utility_settings(cfg: ExperimentConfig) -> dict:
    return {**_base_settings(cfg), "cell": "utility", "utility_concepts": list(cfg.utility_concepts),
            "generation": {"steps": cfg.data.sample_steps, "guidance": cfg.data.guidance}}


def run_utility_cell(cfg: ExperimentConfig, run_dir: Path, folder: Path) -> dict:
    """The oracle's accuracy on each utility concept (evaluate.utility_images generations at seeds drawn per
    experiment seed) on the base model, the no-defense model and every immunized one; each concept tagged
    'same' (the targets' kind) or 'other' (the other kind), as UnlearnCanvas's in- and cross-domain retain."""
    from ..toy.oracle import load_toy_oracle

    t0 = time.time()
    names = list(cfg.utility_concepts)
    target_family = {family(cfg.concept(c).kind) for c in cfg.concepts}
    n, oracle = cfg.evaluate.utility_images, load_toy_oracle()
    gen_seeds = [1000 * cfg.seed + i for i in range(n)]
    accuracy: dict = {}
    models = ([BASE] if _erased(cfg) else []) + models_of(cfg)
    for model in models:
        pipe = _pipe(cfg, run_dir, model)
        ims = generate(pipe, [cfg.concept(c).prompt for c in names for _ in range(n)], gen_seeds * len(names),
                       cfg.data.sample_steps, cfg.data.guidance)
        accuracy[model] = {c: oracle.accuracy(ims[i * n:(i + 1) * n], c) for i, c in enumerate(names)}
    scope = {c: "same" if family(cfg.concept(c).kind) in target_family else "other" for c in names}
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"kind": "utility", "cell": "utility", "seed": cfg.seed, "models": models, "scope": scope,
               "accuracy": accuracy, "n_images": n}
    return _finish(folder, payload, utility_settings(cfg), cfg.seed, t0)


def read_cell(folder: Path) -> dict | None:
    """A finished cell's numbers (None if it never finished: no manifest)."""
    folder = Path(folder)
    if not (folder / "manifest.json").exists() or not (folder / CELL_FILE).exists():
        return None
    return json.loads((folder / CELL_FILE).read_text())
