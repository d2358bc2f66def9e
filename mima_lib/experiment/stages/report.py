"""Stage 06, the report: SGR / MSGR per attack and feature extractor with confidence intervals over the attack
seeds, the oracle's accuracy of the attacked models and utility on the toy world, tables and figures.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...evaluation.features import make_extractor
from ...evaluation.metrics import (confidence_interval, markdown_table, paper_table, sgr_table, similarity_curve,
                                  write_table)
from ...evaluation.plots import write_report
from ...method.diffusion import generate
from ...method.tensor_io import atomic_write_text
from ..artifacts import remove_stale_temporaries, write_manifest
from ..config import ExperimentConfig, stage_settings
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


def _accuracy_rows(cfg, res: AttackStageResult, attack: str) -> list[dict]:
    """Toy world: oracle top-1 accuracy of the attacked models' generations (the most readable number)."""
    from ...toy.oracle import load_toy_oracle

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
    from ...toy.oracle import load_toy_oracle

    oracle, rows, n = load_toy_oracle(), [], cfg.evaluate.utility_images
    for model in models_of(cfg):
        pipe = model_for(cfg, run_dir, model)
        prompts = [cfg.concept(c).prompt for c in cfg.utility_concepts]
        ims = generate(pipe, [p for p in prompts for _ in range(n)], [s for _ in prompts for s in range(n)])
        for i, c in enumerate(cfg.utility_concepts):
            rows.append({"model": model, "concept": c, "oracle_accuracy": oracle.accuracy(ims[i * n:(i + 1) * n], c)})
    return rows


def extractor_for(cfg: ExperimentConfig, name: str):
    """A feature extractor of evaluate.extractors: the toy world's oracle, or CLIP / DINO / LPIPS."""
    if name == "oracle":
        from ...toy.oracle import OracleExtractor

        return OracleExtractor()
    return make_extractor(name, cfg.evaluate.models.get(name))


def report(cfg: ExperimentConfig, run_dir: Path, force: bool = False) -> ReportResult:
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
            extractor = extractor_for(cfg, name)
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
    write_manifest(folder, stage_settings(cfg, "evaluate", "attack", "immunize"), cfg.seed)
    log(f"report written to {folder / 'report.md'}")
    return ReportResult(folder, Markdown(text), figures)
