"""Stages 04 and 05, the attacks: every model (no defense, then each immunization method) is fine-tuned on
every concept's attacker images with every attack method and seed; snapshots at fixed seeds are kept.

04 re-learns an erased concept under its own prompt; 05 personalizes a new instance under a modifier token.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...attacks import make_settings, run_attack
from ...attacks.data import MODIFIER_TOKEN
from ...evaluation.plots import method_step_grid, plot_lines
from ...method.tensor_io import atomic_write_text, load_tensors, save_tensors
from ..artifacts import remove_stale_temporaries, write_manifest
from ..config import ExperimentConfig, attack_defaults, slug, stage_settings
from ..progress import Progress
from .common import log, model_for, models_of, must_run
from .data import load_data


def attack_prompt(cfg: ExperimentConfig, concept: str, method: str) -> str:
    """What the attacker trains on: Textual Inversion re-learns under a placeholder token, every other
    attack under the concept's attack prompt."""
    c = cfg.concept(concept)
    if method == "textual_inversion" and cfg.task == "relearning":
        return c.ti_prompt
    return c.attack_prompt


def attack_settings(cfg: ExperimentConfig, method: str, seed: int) -> dict:
    """The attack's settings from the file, with the run's seed and snapshot steps. Custom Diffusion learns
    its modifier token in personalization, as the method does."""
    s = dict(cfg.attack.settings.get(method, {}))
    s["seed"] = seed
    if cfg.attack.snapshot_steps is not None:
        s["snapshot_steps"] = list(cfg.attack.snapshot_steps)
    if method == "custom_diffusion" and cfg.task == "personalization":
        s.setdefault("modifier_token", MODIFIER_TOKEN)
    return s


def with_horizon(cfg: ExperimentConfig, method: str, settings: dict, horizon: int | None) -> dict:
    """The settings run to `horizon` steps (None: unchanged), with the attack's snapshot steps up to it, and it."""
    if horizon is None:
        return settings
    base = make_settings(method, dict(settings), attack_defaults(cfg))
    return {**settings, "steps": horizon,
            "snapshot_steps": sorted({int(x) for x in base.snapshot_steps if x <= horizon} | {horizon})}


def benign_settings(cfg: ExperimentConfig, seed: int) -> dict:
    """The harmless fine-tune's settings: the LoRA attack's, run to evaluate.benign_steps when set."""
    return with_horizon(cfg, "lora", attack_settings(cfg, "lora", seed), cfg.evaluate.benign_steps)


def run_settings(cfg: ExperimentConfig, concept: str, method: str, seed: int) -> dict:
    """One run's attack settings: a benign concept's harmless LoRA has its own horizon."""
    if concept in cfg.evaluate.benign_concepts:
        return benign_settings(cfg, seed)
    return attack_settings(cfg, method, seed)


def sampling(cfg: ExperimentConfig) -> dict:
    """The snapshots' DDIM steps and guidance: the attack section's, else the data's (the paper's 50 / 7.5)."""
    return {"sample_steps": cfg.attack.sample_steps or cfg.data.sample_steps,
            "guidance": cfg.attack.guidance if cfg.attack.guidance is not None else cfg.data.guidance}


@dataclass
class AttackStageResult:
    cfg: ExperimentConfig
    folder: Path
    snapshots: dict  # (model, concept, attack, seed) -> {step: images}; benign concepts too (their LoRA runs)

    def summary(self) -> None:
        for (model, concept, attack, seed), snaps in self.snapshots.items():
            log(f"{model:>16s} | {concept:>16s} | {attack} seed {seed}: snapshots at {sorted(snaps)}")

    def runs(self, attack: str, seed: int, concepts=None) -> dict:
        """{model: {concept: {step: images}}} of one attack method and seed (default: the targets)."""
        concepts = set(self.cfg.concepts if concepts is None else concepts)
        out: dict = {}
        for (model, concept, a, s), snaps in self.snapshots.items():
            if a == attack and s == seed and concept in concepts:
                out.setdefault(model, {})[concept] = snaps
        return out


def run_folder(run_dir: Path, model: str, concept: str, attack: str, seed: int) -> Path:
    return Path(run_dir) / "attacks" / slug(model) / slug(concept) / attack / f"seed{seed}"


def jobs(cfg: ExperimentConfig) -> list[tuple[str, str, str, int]]:
    """(model, concept, attack, seed) of every run: each attack on each target, and the harmless LoRA
    fine-tune on each benign concept (evaluate.benign_concepts), on every model."""
    out = []
    for model in models_of(cfg):
        out += [(model, c, m, s) for c in cfg.concepts for m in cfg.attack.methods for s in cfg.attack.seeds]
        out += [(model, c, "lora", s) for c in cfg.evaluate.benign_concepts for s in cfg.attack.seeds]
    return out


def _settings(cfg: ExperimentConfig, concept: str, method: str, seed: int) -> dict:
    """What one attack run's manifest records (a change of any of these redoes the run)."""
    return {**stage_settings(cfg, "erase", "data", "immunize"), "attack": method,
            "attack_settings": run_settings(cfg, concept, method, seed), "n_images": cfg.attack.n_images,
            **sampling(cfg)}


def attack(cfg: ExperimentConfig, run_dir: Path, force: bool = False) -> AttackStageResult:
    """Attack every model (no defense + each immunization method) on every concept, with every attack."""
    data = load_data(cfg, run_dir)
    snapshots = {}
    todo = [job for job in jobs(cfg) if must_run(run_folder(run_dir, *job), _settings(cfg, *job[1:]), force)]
    bar = Progress("attacks done", len(todo), log, every=1)  # one line per finished run, with the ETA
    for model, concept, method, seed in jobs(cfg):
        folder = run_folder(run_dir, model, concept, method, seed)
        settings = _settings(cfg, concept, method, seed)
        if (model, concept, method, seed) in todo:
            log(f"attack {method} (seed {seed}) on {model!r} for {concept!r}")
            remove_stale_temporaries(folder)  # what a killed earlier try left
            pipe = model_for(cfg, run_dir, model)
            prompt = attack_prompt(cfg, concept, method)
            n = cfg.attack.n_images
            result = run_attack(method, pipe, data.images[concept]["attack"], prompt,
                                settings["attack_settings"], defaults=attack_defaults(cfg),
                                snapshot_prompts=[prompt] * n, snapshot_seeds=list(range(n)), progress=False,
                                checkpoint_dir=folder / "checkpoint", **sampling(cfg))
            save_tensors({str(k): v for k, v in result.snapshots.items()}, folder / "snapshots.safetensors")
            atomic_write_text(folder / "losses.json", json.dumps({"losses": result.losses, "prompt": prompt}))
            write_manifest(folder, settings, seed)
            bar.update()
        snaps = load_tensors(folder / "snapshots.safetensors")
        snapshots[(model, concept, method, seed)] = {int(k): v for k, v in snaps.items()}
    return AttackStageResult(cfg, Path(run_dir) / "attacks", snapshots)


def load_attacks(cfg: ExperimentConfig, run_dir: Path) -> AttackStageResult:
    snapshots = {}
    for model, concept, method, seed in jobs(cfg):
        path = run_folder(run_dir, model, concept, method, seed) / "snapshots.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the attack notebook (04 or 05) first")
        snapshots[(model, concept, method, seed)] = {int(k): v for k, v in load_tensors(path).items()}
    return AttackStageResult(cfg, Path(run_dir) / "attacks", snapshots)


def show_attacks(res: AttackStageResult, concept: str | None = None, index: int = 0):
    """Rows: models; columns: snapshot steps; one concept, the first attack and seed."""
    cfg = res.cfg
    concept = concept or cfg.concepts[0]
    method = cfg.attack.methods[0] if concept in cfg.concepts else "lora"  # a benign concept's harmless LoRA
    runs = res.runs(method, cfg.attack.seeds[0], concepts=[concept])
    return method_step_grid({m: per[concept] for m, per in runs.items()}, index=index)


def show_attack_curves(res: AttackStageResult):
    """Oracle accuracy over attack steps, one panel per target and a line per model (the first attack and
    seed; toy concepts only, None when there are none): is the concept back?"""
    cfg = res.cfg
    method, seed = cfg.attack.methods[0], cfg.attack.seeds[0]
    if not cfg.is_toy:
        return None
    from ...toy.oracle import load_toy_oracle

    oracle, runs = load_toy_oracle(), res.runs(method, seed)
    known = [c for c in cfg.concepts if c in oracle.labels]
    curves = {c: {m: {s: oracle.accuracy(ims, c) for s, ims in runs[m][c].items()} for m in runs} for c in known}
    return plot_lines(curves, f"{method} step", "oracle accuracy", percent=True,
                      title=f"{method}, seed {seed}: is the concept back?") if curves else None


def show_attack_losses(res: AttackStageResult, run_dir: Path):
    """The attacker's training loss per step (each run's losses.json, a running mean over a tenth of the run:
    single steps are noisy), one panel per target and a line per model, for the first attack and seed."""
    cfg = res.cfg
    method, seed = cfg.attack.methods[0], cfg.attack.seeds[0]
    panels = {}
    for c in cfg.concepts:
        for m in res.runs(method, seed):
            xs = json.loads((run_folder(run_dir, m, c, method, seed) / "losses.json").read_text())["losses"]
            w = max(1, len(xs) // 10)
            panels.setdefault(c, {})[m] = {i + 1: sum(xs[max(0, i - w + 1):i + 1]) / min(w, i + 1)
                                           for i in range(len(xs))}
    return plot_lines(panels, f"{method} step", "training loss (running mean)")
