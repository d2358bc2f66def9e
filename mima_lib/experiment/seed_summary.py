"""The report over seeds of a `seeds:` file run by the notebook runner (mima_lib.experiment.run).

Each seed ran the whole sequence in its own folder, runs/<experiment>/seed<k>/, and wrote its own report
(stage 06). This reads those reports' tables back, nothing else (no model, no image), and writes
runs/<experiment>/report/report.md: per attack, MSGR and the oracle's target accuracy per model as mean ± 95%
Student-t interval over seeds, MIMA minus the best baseline paired by seed, the steps to re-learn and the
accuracy curves with CI bands; the harmless fine-tune and utility the same way; the first seed's grids.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..evaluation.metrics import confidence_interval, markdown_table, read_table, steps_to_relearn
from ..evaluation.plots import plot_similarity_curves
from ..method.tensor_io import atomic_write_text
from .grid_report import IMMUNIZED_FIRST, fmt, paired_mima_row
from .stages.common import BASELINE, models_of


def read_seed_tables(cfg, run_dirs: dict[int, Path], name: str) -> dict[int, list[dict]]:
    """{seed: rows} of one table of every seed's report (<attack>, benign_lora, utility)."""
    out = {}
    for seed, run_dir in run_dirs.items():
        path = Path(run_dir) / "report" / f"{name}.csv"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: seed {seed}'s report (06_report) has not run; rerun the "
                                    "same command to resume")
        out[seed] = read_table(path)
    return out


def _extractor(cfg) -> str:
    return "oracle" if "oracle" in cfg.evaluate.extractors else cfg.evaluate.extractors[0]


def target_accuracy(rows: list[dict], model: str) -> dict[int, float]:
    """{step: the oracle's accuracy averaged over the concepts} of one model in one seed's attack table."""
    by_step: dict = {}
    for r in rows:
        if r["metric"] == "ACC" and r["method"] == model:
            by_step.setdefault(int(r["step"]), []).append(float(r["mean"]))
    return {s: float(np.mean(v)) for s, v in sorted(by_step.items())}


def msgr_by_step(rows: list[dict], model: str, extractor: str) -> dict[int, float]:
    return {int(r["step"]): float(r["mean"]) for r in rows
            if r["metric"] == "MSGR" and r["method"] == model and r["extractor"] == extractor}


def attack_section(cfg, attack: str, tables: dict[int, list[dict]], folder: Path) -> str:
    """The paper-style table of one attack over seeds, the paired MIMA difference and the accuracy curves."""
    ext, models, seeds = _extractor(cfg), models_of(cfg), sorted(tables)
    acc = {m: {s: target_accuracy(tables[s], m) for s in seeds} for m in models}
    steps = sorted(set.intersection(*(set(c) for m in models for c in acc[m].values() if c)) or {0})
    last, th = max(steps), cfg.grid.relearn_threshold
    rows, curve_rows = [], []
    for m in models:
        row = {"model": m, f"MSGR @{last} (%)": "" if m == BASELINE else
               fmt([msgr_by_step(tables[s], m, ext).get(last) for s in seeds], 100, 1)}
        for step in steps:
            vals = [acc[m][s].get(step) for s in seeds]
            row[f"acc @{step} (%)"] = fmt(vals, 100, 0)
            if all(v is not None for v in vals):
                mean, half = confidence_interval(vals)
                curve_rows.append({"metric": "ACC", "method": m, "concept": attack, "step": step, "mean": mean,
                                   "ci95": half})
        own = [steps_to_relearn(acc[m][s], th) for s in seeds if acc[m][s]]
        mean_curve = {st: float(np.mean([acc[m][s][st] for s in seeds])) for st in steps}
        hit = steps_to_relearn(mean_curve, th)
        row[f"steps to {th:.0%}"] = (f"{hit}" if hit is not None else f"not within {last}") + \
            f" ({sum(o is not None for o in own)}/{len(own)} seeds)"
        rows.append(row)
    text = (f"## {attack}: {len(seeds)} seeds, mean ± 95% CI\n\nMSGR ({ext} similarity; higher = better "
            "protection) at the last step and the oracle's accuracy on the targets (mean over targets; lower = "
            "better protection) at every snapshot step; steps to re-learn: first step at which the seed-mean "
            "accuracy reaches the threshold (in brackets the seeds whose own curve reaches it).\n\n"
            + markdown_table(rows) + "\n")
    baselines = [m for m in cfg.immunize.methods if m != IMMUNIZED_FIRST]
    if IMMUNIZED_FIRST in cfg.immunize.methods and baselines:
        by_model = {m: {s: msgr_by_step(tables[s], m, ext).get(last) for s in seeds}
                    for m in [IMMUNIZED_FIRST] + baselines}
        if all(v is not None for d in by_model.values() for v in d.values()):
            p = paired_mima_row(by_model, baselines)
            ci = "n/a (one seed)" if math.isnan(p["ci95"]) else f"± {p['ci95']:.2f}"
            text += (f"\nMIMA minus the best baseline ({p['best_baseline']}) at step {last}: **{p['difference']:.2f}"
                     f" MSGR points** {ci} (paired by seed, {p['seeds']} seeds)\n")
    path = folder / f"{attack}_accuracy_curves.png"
    plot_similarity_curves(curve_rows, metric="ACC", concepts=[attack], path=path,
                           title=f"{attack}: oracle accuracy on the targets (95% CI over seeds)")
    return text + f"\n![{attack} accuracy over steps]({path.name})\n"


def benign_section(cfg, tables: dict[int, list[dict]]) -> str:
    seeds, rows = sorted(tables), []
    for m in models_of(cfg):
        curves = [target_accuracy(tables[s], m) for s in seeds]
        last = max(max(c) for c in curves if c)
        rows.append({"model": m, f"accuracy @{last} (%)": fmt([c.get(last) for c in curves], 100, 0)})
    return (f"## Harmless fine-tuning: LoRA on {', '.join(cfg.evaluate.benign_concepts)} (held out; it should "
            "succeed on the immunized models as on the no-defense one)\n\n" + markdown_table(rows) + "\n")


def utility_section(cfg, tables: dict[int, list[dict]]) -> str:
    seeds, rows = sorted(tables), []
    for m in models_of(cfg):
        row = {"model": m}
        for c in cfg.utility_concepts:
            vals = [next((r.get("oracle_accuracy") for r in tables[s] if r["model"] == m and r["concept"] == c),
                         None) for s in seeds]
            row[f"{c} (%)"] = fmt([v for v in vals if isinstance(v, (int, float))], 100, 0)
        rows.append(row)
    return ("## Utility: the oracle's accuracy on non-target concepts after immunization (%), mean ± 95% CI\n\n"
            + markdown_table(rows) + "\n")


def write_seed_summary(cfg, run_dirs: dict[int, Path], folder: Path) -> Path:
    """The report over seeds (see the module docstring) into folder/report.md; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    seeds = sorted(run_dirs)
    first = Path(run_dirs[seeds[0]]) / "report"
    sections = [f"# Report: {cfg.experiment}, {len(seeds)} seeds ({seeds})\n",
                f"Task: {cfg.task}; concepts: {', '.join(cfg.concepts)}; model: {cfg.model}; attacks: "
                f"{', '.join(cfg.attack.methods)}. Each seed draws its own data, immunizes and attacks in its own "
                f"folder (seed<k>/, with its own report); every number below is a mean over seeds with its 95% "
                "Student-t interval. With few images per cell, one image is "
                f"{100 / max(cfg.attack.n_images, 1):.0f} accuracy points of one seed.\n"]
    for attack in cfg.attack.methods:
        sections.append(attack_section(cfg, attack, read_seed_tables(cfg, run_dirs, attack), folder))
    if cfg.evaluate.benign_concepts:
        sections.append(benign_section(cfg, read_seed_tables(cfg, run_dirs, "benign_lora")))
    if cfg.utility_concepts and all(cfg.concept(c).toy for c in cfg.utility_concepts) and cfg.is_toy:
        sections.append(utility_section(cfg, read_seed_tables(cfg, run_dirs, "utility")))
    pictures = sorted(p.name for p in first.glob("*_grid*.png"))
    rel = Path("..") / first.relative_to(folder.parent)
    sections.append(f"## Pictures (seed {seeds[0]})\n\n" + "\n".join(f"![{Path(p).stem}]({rel / p})" for p in pictures)
                    + "\n")
    path = folder / "report.md"
    atomic_write_text(path, "\n".join(sections))
    return path
