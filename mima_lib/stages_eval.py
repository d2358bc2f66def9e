"""Stages 04/05 (attacks on every model) and 06 (report). See stages.py for the run-folder layout."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import toyworld
from .artifacts import atomic_write_text, load_tensors, remove_stale_temporaries, save_tensors, write_manifest
from .attack_data import MODIFIER_TOKEN, textual_inversion_prompt
from .diffusion import generate
from .experiment import ExperimentConfig, concept_prompt, slug
from .stages import _fresh, _settings, attack_prompt, load_data, log, model_for

BASELINE = "no defense"


def models_of(cfg: ExperimentConfig) -> list[str]:
    return [BASELINE] + list(cfg.immunize.methods)


def _prompt_for(cfg: ExperimentConfig, concept: str, method: str) -> str:
    if method == "textual_inversion" and cfg.task == "relearning":
        if concept in cfg.prompts:  # a real-model concept: its words become the new token
            return cfg.prompts[concept].replace(concept, MODIFIER_TOKEN)
        return textual_inversion_prompt(concept)
    return attack_prompt(cfg, concept)


def attack_settings(cfg: ExperimentConfig, method: str, seed: int) -> dict:
    s = dict(cfg.attack.settings.get(method, {}))
    s["seed"] = seed
    if cfg.attack.snapshot_steps is not None:
        s["snapshot_steps"] = list(cfg.attack.snapshot_steps)
    return s


@dataclass
class AttackStageResult:
    cfg: ExperimentConfig
    folder: Path
    snapshots: dict  # (model, concept, attack, seed) -> {step: images}

    def summary(self) -> None:
        for (model, concept, attack, seed), snaps in self.snapshots.items():
            log(f"{model:>16s} | {concept:>16s} | {attack} seed {seed}: snapshots at {sorted(snaps)}")

    def runs(self, attack: str, seed: int) -> dict:
        """{model: {concept: {step: images}}} of one attack method and seed."""
        out: dict = {}
        for (model, concept, a, s), snaps in self.snapshots.items():
            if a == attack and s == seed:
                out.setdefault(model, {})[concept] = snaps
        return out


def run_folder(run_dir: Path, model: str, concept: str, attack: str, seed: int) -> Path:
    return Path(run_dir) / "attacks" / slug(model) / slug(concept) / attack / f"seed{seed}"


def attack(cfg: ExperimentConfig, run_dir: Path, force: bool = False) -> AttackStageResult:
    """Attack every model (no defense + each immunization method) on every concept, with every attack."""
    from .attacks import run_attack

    data = load_data(cfg, run_dir)
    snapshots = {}
    for model in models_of(cfg):
        for concept in cfg.concepts:
            for method in cfg.attack.methods:
                for seed in cfg.attack.seeds:
                    folder = run_folder(run_dir, model, concept, method, seed)
                    settings = {**_settings(cfg, "erase", "data", "immunize"), "attack": method,
                                "attack_settings": attack_settings(cfg, method, seed),
                                "n_images": cfg.attack.n_images}
                    if _fresh(folder, settings, force):
                        log(f"attack {method} (seed {seed}) on {model!r} for {concept!r}")
                        remove_stale_temporaries(folder)  # what a killed earlier try left
                        pipe = model_for(cfg, run_dir, model)
                        prompt = _prompt_for(cfg, concept, method)
                        n = cfg.attack.n_images
                        result = run_attack(method, pipe, data.images[concept]["attack"], prompt,
                                            attack_settings(cfg, method, seed), snapshot_prompts=[prompt] * n,
                                            snapshot_seeds=list(range(n)), progress=False,
                                            checkpoint_dir=folder / "checkpoint")
                        save_tensors({str(k): v for k, v in result.snapshots.items()},
                                     folder / "snapshots.safetensors")
                        atomic_write_text(folder / "losses.json", json.dumps({"losses": result.losses,
                                                                               "prompt": prompt}))
                        write_manifest(folder, settings, seed)
                    snaps = load_tensors(folder / "snapshots.safetensors")
                    snapshots[(model, concept, method, seed)] = {int(k): v for k, v in snaps.items()}
    return AttackStageResult(cfg, Path(run_dir) / "attacks", snapshots)


def load_attacks(cfg: ExperimentConfig, run_dir: Path) -> AttackStageResult:
    snapshots = {}
    for model in models_of(cfg):
        for concept in cfg.concepts:
            for method in cfg.attack.methods:
                for seed in cfg.attack.seeds:
                    path = run_folder(run_dir, model, concept, method, seed) / "snapshots.safetensors"
                    if not path.exists():
                        raise FileNotFoundError(f"{path} is missing: run the attack notebook (04 or 05) first")
                    snapshots[(model, concept, method, seed)] = {int(k): v for k, v in load_tensors(path).items()}
    return AttackStageResult(cfg, Path(run_dir) / "attacks", snapshots)


def show_attacks(res: AttackStageResult, concept: str | None = None, index: int = 0):
    """Rows: models; columns: snapshot steps; one concept, the first attack and seed."""
    from .plots import method_step_grid

    cfg = res.cfg
    concept = concept or cfg.concepts[0]
    runs = res.runs(cfg.attack.methods[0], cfg.attack.seeds[0])
    return method_step_grid({m: per[concept] for m, per in runs.items()}, index=index)


# ---------------------------------------------------------------------------------------- 06 report
@dataclass
class ReportResult:
    folder: Path
    table: object  # the paper-style markdown table (displays in Jupyter)
    figures: list

    def show(self):
        from IPython.display import Image, display

        for f in self.figures:
            if str(f).endswith(".png"):
                display(Image(filename=str(f)))


class Markdown(str):
    def _repr_markdown_(self):
        return str(self)


def _accuracy_rows(cfg, res: AttackStageResult, attack: str) -> list[dict]:
    """Toy world: oracle top-1 accuracy of the attacked models' generations (the most readable number)."""
    from .evaluate import confidence_interval
    from .models import load_toy_oracle

    oracle, rows = load_toy_oracle(), []
    for model in models_of(cfg):
        for concept in cfg.concepts:
            steps = res.snapshots[(model, concept, attack, cfg.attack.seeds[0])]
            for step in sorted(steps):
                vals = [oracle.accuracy(res.snapshots[(model, concept, attack, s)][step], concept)
                        for s in cfg.attack.seeds]
                mean, half = confidence_interval(vals)
                rows.append({"extractor": "oracle", "method": model, "concept": concept, "step": step,
                             "metric": "ACC", "mean": mean, "ci95": half, "n": len(vals)})
    return rows


def utility_rows(cfg: ExperimentConfig, run_dir: Path) -> list[dict]:
    """Non-target concepts before vs after immunization: oracle accuracy (toy) of n generations each."""
    if not cfg.is_toy or not cfg.utility_concepts:
        return []
    from .models import load_toy_oracle

    oracle, rows, n = load_toy_oracle(), [], cfg.evaluate.utility_images
    for model in models_of(cfg):
        pipe = model_for(cfg, run_dir, model)
        prompts = [concept_prompt(cfg, c) for c in cfg.utility_concepts]
        ims = generate(pipe, [p for p in prompts for _ in range(n)], [s for _ in prompts for s in range(n)])
        for i, c in enumerate(cfg.utility_concepts):
            rows.append({"model": model, "concept": c, "oracle_accuracy": oracle.accuracy(ims[i * n:(i + 1) * n], c)})
    return rows


def report(cfg: ExperimentConfig, run_dir: Path, force: bool = False) -> ReportResult:
    from .evaluate import markdown_table, paper_table, sgr_table, similarity_curve, write_table
    from .features import make_extractor
    from .plots import write_report

    res = load_attacks(cfg, run_dir)
    data = load_data(cfg, run_dir)
    refs = {c: data.images[c]["reference"] for c in cfg.concepts}
    folder = Path(run_dir) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)  # what a killed earlier try left
    sections = [f"# Report: {cfg.experiment}\n", f"Task: {cfg.task}; concepts: {', '.join(cfg.concepts)}; "
                f"model: {cfg.model}; attacks: {', '.join(cfg.attack.methods)}; seeds: {cfg.attack.seeds}\n"]
    figures: list = []
    for attack in cfg.attack.methods:
        rows = []
        for name in cfg.evaluate.extractors:
            extractor = make_extractor(name, cfg.evaluate.models.get(name))
            curves = {}
            for seed in cfg.attack.seeds:
                runs = res.runs(attack, seed)
                curves[seed] = {m: {c: similarity_curve(refs[c], runs[m][c], extractor) for c in cfg.concepts} for m in runs}
            rows += sgr_table(curves, baseline=BASELINE, extractor=name)
        if cfg.is_toy:
            rows += _accuracy_rows(cfg, res, attack)
        snaps = {c: {m: res.runs(attack, cfg.attack.seeds[0])[m][c] for m in models_of(cfg)} for c in cfg.concepts}
        figures += write_report(folder, attack, rows, snaps)
        last = max(r["step"] for r in rows)
        sections.append(f"## {attack}: SGR (%) at step {last}\n")
        for name in cfg.evaluate.extractors:
            sub = [r for r in rows if r["extractor"] == name]
            sections.append(f"### {name}\n\n" + markdown_table(paper_table(sub, last)) + "\n")
        if cfg.is_toy:
            acc = [r for r in rows if r["metric"] == "ACC"]
            sections.append("### oracle accuracy of the attacked models (lower = better protection)\n\n"
                            + markdown_table(paper_table(acc, last, metric="ACC", percent=False)) + "\n")
    util = utility_rows(cfg, run_dir)
    if util:
        write_table(util, folder, "utility")
        sections.append("## Utility: non-target concepts after immunization (oracle accuracy)\n\n"
                        + markdown_table(util) + "\n")
    sections.append("## Figures\n\n" + "\n".join(f"![{Path(f).stem}]({Path(f).name})" for f in figures
                                                 if str(f).endswith(".png")) + "\n")
    text = "\n".join(sections)
    atomic_write_text(folder / "report.md", text)
    write_manifest(folder, _settings(cfg, "evaluate", "attack", "immunize"), cfg.seed)
    log(f"report written to {folder / 'report.md'}")
    return ReportResult(folder, Markdown(text), figures)
