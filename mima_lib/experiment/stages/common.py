"""What every stage shares: the log line, the skip-or-redo rule, and the models a stage starts from.

    runs/<experiment>/data/<concept>/{immunize,attack,reference}/   01: images + metadata.csv
    runs/<experiment>/data/regularization/<prompt>/                  01: prior / merge regularization images
    runs/<experiment>/erased/                                        02: UCE-edited K/V weights
    runs/<experiment>/immunized/<method>/                            03: changed parameters + settings
    runs/<experiment>/attacks/<model>/<concept>/<attack>/seed<k>/    04/05: snapshots + losses
    runs/<experiment>/report/                                        06: tables and figures

A stage whose folder holds a manifest made with the same settings is skipped (force=True redoes it);
one made with other settings is refused. Notebooks only call the stage functions and show their pictures.
"""
from __future__ import annotations

import time
from pathlib import Path

from ...method.immunize import load_immunized
from ...method.paramsets import apply_unet_params
from ...method.pipeline import device_for, load_pipeline
from ...method.tensor_io import load_tensors
from ..artifacts import check_manifest
from ..config import ExperimentConfig, slug

BASELINE = "no defense"  # the erased (or base) model attacked without immunization


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def must_run(folder: Path, settings: dict, force: bool) -> bool:
    """True if the stage in folder must (re)run: forced, or no finished manifest with these settings."""
    if force:
        return True
    return not check_manifest(folder, settings)


def base_pipeline(cfg: ExperimentConfig):
    """The experiment's model as published: the embedded toy for `model: toy`, else a folder or hub id."""
    device = device_for(cfg.device)
    if cfg.is_toy:
        from ...toy.model import load_toy_pipeline

        return load_toy_pipeline(device=device)
    return load_pipeline(cfg.model, device=device)


def starting_pipeline(cfg: ExperimentConfig, run_dir: Path):
    """The model immunization starts from: the base model, UCE-erased for the re-learning task."""
    pipe = base_pipeline(cfg)
    weights = Path(run_dir) / "erased" / "erased.safetensors"
    if cfg.task == "relearning" and cfg.erase.enabled:
        if not weights.exists():
            raise FileNotFoundError(f"{weights} is missing: run 02_erasure first")
        apply_unet_params(pipe.unet, load_tensors(weights))
    return pipe


def model_for(cfg: ExperimentConfig, run_dir: Path, method: str):
    """'no defense' (erased only) or an immunization method's model."""
    pipe = starting_pipeline(cfg, run_dir)
    if method != BASELINE:
        load_immunized(pipe, Path(run_dir) / "immunized" / slug(method))
    return pipe


def models_of(cfg: ExperimentConfig) -> list[str]:
    """The models every attack runs on: no defense, then each immunization method."""
    return [BASELINE] + list(cfg.immunize.methods)
