"""Stage 06, the report: SGR / MSGR per attack and feature extractor with confidence intervals over the attack
seeds, the oracle's accuracy of the attacked models and utility on the toy world, tables and figures.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...evaluation.metrics import (confidence_interval, markdown_table, paper_table, sgr_table, similarity_curve,
                                  write_table)
from ...evaluation.plots import labelled_grid, write_report
from ...method.diffusion import generate
from ...method.tensor_io import atomic_write_text
from ..artifacts import remove_stale_temporaries, write_manifest
from ..config import ExperimentConfig, extractor_for, stage_settings
from .attack import AttackStageResult, load_attacks
from .common import BASELINE, log, model_for, models_of
from .data import load_data


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


def _accuracy_rows(cfg, res: AttackStageResult, attack: str, concepts: list[str]) -> list[dict]:
    """Toy world: oracle top-1 accuracy of the attacked models' generations (the most readable number)."""
    from ...toy.oracle import load_toy_oracle

    oracle, rows = load_toy_oracle(), []
    for model in models_of(cfg):
        for concept in concepts:
            steps = res.snapshots[(model, concept, attack, cfg.attack.seeds[0])]
            for step in sorted(steps):
                vals = [oracle.accuracy(res.snapshots[(model, concept, attack, s)][step], concept)
                        for s in cfg.attack.seeds]
                mean, half = confidence_interval(vals)
                rows.append({"extractor": "oracle", "method": model, "concept": concept, "step": step,
                             "metric": "ACC", "mean": mean, "ci95": half, "n": len(vals)})
    return rows


SHOWN = 2  # generations per non-target concept in the utility grid


def utility_rows(cfg: ExperimentConfig, run_dir: Path, shown: dict | None = None) -> list[dict]:
    """Non-target concepts before vs after immunization, n generations each at fixed seeds: the oracle's
    accuracy on the toy world, and the CLIP score of each generation to its prompt when CLIP is an extractor
    (the real-model utility). ``shown``: filled with {model: the first SHOWN generations of each concept},
    for the utility grid (do the non-targets stay images?)."""
    use_oracle = cfg.is_toy and all(cfg.concept(c).toy for c in cfg.utility_concepts)
    use_clip = "clip" in cfg.evaluate.extractors
    if not cfg.utility_concepts or not (use_oracle or use_clip):
        return []
    oracle = None
    if use_oracle:
        from ...toy.oracle import load_toy_oracle

        oracle = load_toy_oracle()
    clip = extractor_for(cfg, "clip") if use_clip else None
    rows, n = [], cfg.evaluate.utility_images
    prompts = [cfg.concept(c).prompt for c in cfg.utility_concepts]
    for model in models_of(cfg):
        pipe = model_for(cfg, run_dir, model)
        ims = generate(pipe, [p for p in prompts for _ in range(n)], [s for _ in prompts for s in range(n)],
                       **_generation(cfg))
        if shown is not None:
            shown[model] = [ims[i * n + k] for i in range(len(prompts)) for k in range(min(SHOWN, n))]
        for i, c in enumerate(cfg.utility_concepts):
            row = {"model": model, "concept": c}
            if oracle is not None:
                row["oracle_accuracy"] = oracle.accuracy(ims[i * n:(i + 1) * n], c)
            if clip is not None:
                row["clip_score"] = float(clip.clip_score(ims[i * n:(i + 1) * n], [prompts[i]] * n).mean())
            rows.append(row)
    return rows


def _generation(cfg: ExperimentConfig) -> dict:
    from .attack import sampling

    s = sampling(cfg)
    return {"steps": s["sample_steps"], "guidance": s["guidance"]}


def _attack_rows(cfg, res: AttackStageResult, refs: dict, attack: str, concepts: list[str]) -> list[dict]:
    """SGR rows of one attack on these concepts, per extractor, with CIs over the attack seeds (+ toy ACC)."""
    rows = []
    for name in cfg.evaluate.extractors:
        extractor = extractor_for(cfg, name)
        curves = {}
        for seed in cfg.attack.seeds:
            runs = res.runs(attack, seed, concepts)
            curves[seed] = {m: {c: similarity_curve(refs[c], runs[m][c], extractor) for c in concepts}
                            for m in runs}
        rows += sgr_table(curves, baseline=BASELINE, extractor=name)
    if cfg.is_toy and all(cfg.concept(c).toy for c in concepts):
        rows += _accuracy_rows(cfg, res, attack, concepts)
    return rows


def _tables(cfg, rows: list[dict], last: int, accuracy_note: str) -> list[str]:
    out = []
    for name in cfg.evaluate.extractors:
        sub = [r for r in rows if r["extractor"] == name]
        out.append(f"### {name}\n\n" + markdown_table(paper_table(sub, last)) + "\n")
    acc = [r for r in rows if r["metric"] == "ACC"]
    if acc:
        out.append(f"### oracle accuracy of the attacked models ({accuracy_note})\n\n"
                   + markdown_table(paper_table(acc, last, metric="ACC", percent=False)) + "\n")
    return out


def report(cfg: ExperimentConfig, run_dir: Path, force: bool = False) -> ReportResult:
    res = load_attacks(cfg, run_dir)
    data = load_data(cfg, run_dir)
    benign = cfg.evaluate.benign_concepts
    refs = {c: data.images[c]["reference"] for c in cfg.concepts + benign}
    folder = Path(run_dir) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)  # what a killed earlier try left
    sections = [f"# Report: {cfg.experiment}\n", f"Task: {cfg.task}; concepts: {', '.join(cfg.concepts)}; "
                f"model: {cfg.model}; attacks: {', '.join(cfg.attack.methods)}; seeds: {cfg.attack.seeds}\n"]
    figures: list = []
    for attack in cfg.attack.methods:
        rows = _attack_rows(cfg, res, refs, attack, cfg.concepts)
        snaps = {c: {m: res.runs(attack, cfg.attack.seeds[0])[m][c] for m in models_of(cfg)} for c in cfg.concepts}
        figures += write_report(folder, attack, rows, snaps)
        last = max(r["step"] for r in rows)
        sections.append(f"## {attack}: SGR (%) at step {last}\n")
        sections += _tables(cfg, rows, last, "lower = better protection")
    if benign:
        rows = _attack_rows(cfg, res, refs, "lora", benign)
        snaps = {c: {m: res.runs("lora", cfg.attack.seeds[0], benign)[m][c] for m in models_of(cfg)} for c in benign}
        figures += write_report(folder, "benign_lora", rows, snaps)
        last = max(r["step"] for r in rows)
        sections.append(f"## Harmless fine-tuning: LoRA on {', '.join(benign)} at step {last} (SGR near 0 = the "
                        "immunized model still learns new concepts)\n")
        sections += _tables(cfg, rows, last, "higher = fine-tuning works")
    shown: dict = {}
    util = utility_rows(cfg, run_dir, shown)
    if util:
        write_table(util, folder, "utility")
        cols = [f"{c} #{k}" for c in cfg.utility_concepts for k in range(min(SHOWN, cfg.evaluate.utility_images))]
        labelled_grid(torch.stack([im for m in shown for im in shown[m]]), list(shown), cols,
                      path=folder / "utility_grid.png")
        figures.append(folder / "utility_grid.png")
        sections.append("## Utility: non-target concepts after immunization\n\n" + markdown_table(util) + "\n")
    sections.append("## Figures\n\n" + "\n".join(f"![{Path(f).stem}]({Path(f).name})" for f in figures
                                                 if str(f).endswith(".png")) + "\n")
    text = "\n".join(sections)
    atomic_write_text(folder / "report.md", text)
    write_manifest(folder, stage_settings(cfg, "evaluate", "attack", "immunize"), cfg.seed)
    log(f"report written to {folder / 'report.md'}")
    return ReportResult(folder, Markdown(text), figures)
