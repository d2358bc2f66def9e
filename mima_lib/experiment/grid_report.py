"""The seed grid's report, rebuilt from the cells' cell.json files alone (no model, no image is reloaded).

Every number is a mean over seeds with its 95% Student-t interval (metrics.confidence_interval): the paper's
table (MSGR and the oracle's target accuracy per model and attack at the report step, LoRA also at its long
step), MIMA minus the best baseline paired by seed, the stronger attackers, target accuracy over steps with CI
bands and the steps to re-learn, utility on non-targets of the same and of the other kind, and the harmless
fine-tune. Written to runs/<experiment>/report/report.md with its figure and a summary.json.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..evaluation.metrics import confidence_interval, markdown_table, paired_difference, sgr, steps_to_relearn
from ..evaluation.plots import plot_similarity_curves
from ..method.tensor_io import atomic_write_text
from .grid_cells import BASE, cell_dir, read_cell
from .stages.common import BASELINE

IMMUNIZED_FIRST = "mima"


def fmt(values, scale: float = 1.0, digits: int = 1) -> str:
    """'mean ± half-width' over seeds ('mean' alone for one seed, '' for none)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return ""
    mean, half = confidence_interval(values)
    text = f"{scale * mean:.{digits}f}"
    return text if math.isnan(half) else f"{text} ± {scale * half:.{digits}f}"


def load_cells(cfg, root: Path, names: list[str]) -> tuple[dict, list[str]]:
    """{cell: {seed: cell.json}} of the finished cells, and the (seed, cell) pairs still missing."""
    from .grid import grid_seeds

    found, missing = {}, []
    for name in names:
        for seed in grid_seeds(cfg):
            cell = read_cell(cell_dir(root, seed, name))
            if cell is None:
                missing.append(f"seed {seed} / {name}")
            else:
                found.setdefault(name, {})[seed] = cell
    return found, missing


def _extractor(cfg) -> str:
    return cfg.evaluate.extractors[0]


def msgr_at(cell: dict, model: str, step: int, extractor: str) -> float | None:
    """One seed's MSGR of a model at a step: SGR against that seed's no-defense run, averaged over targets."""
    res, key = cell["results"], str(step)
    if model == BASELINE or key not in res[BASELINE][cell["concepts"][0]]["M"][extractor]:
        return None
    vals = [sgr(res[BASELINE][c]["M"][extractor][key], res[model][c]["M"][extractor][key]) for c in cell["concepts"]]
    return float(np.mean(vals))


def accuracy_at(cell: dict, model: str, step: int) -> float | None:
    per = [cell["results"][model][c].get("accuracy", {}).get(str(step)) for c in cell["concepts"]]
    return None if any(v is None for v in per) else float(np.mean(per))


def _columns(cfg, cells) -> list[tuple[str, str, int]]:
    """(label, cell, step) of the paper's table: every plain attack at the report step, LoRA at its long step."""
    step = cfg.grid.report_step
    cols = [(f"{c.name} @{step}", c.name, step) for c in cells if not c.is_variant]
    if any(c.name == "lora" for c in cells):
        long = cfg.grid.long_step
        cols.append(("lora @long", "lora", long))  # resolved per cell below when None
    return cols


def _step(cellset: dict, step: int | None) -> int:
    return step if step is not None else max(next(iter(cellset.values()))["steps"])


def _models(cfg) -> list[str]:
    return [BASELINE] + list(cfg.immunize.methods)


def paper_tables(cfg, found: dict, cells) -> tuple[str, dict]:
    ext, models = _extractor(cfg), _models(cfg)
    msgr_rows, acc_rows, per_seed = [], [], {}
    cols = [(label, name, _step(found[name], step)) for label, name, step in _columns(cfg, cells) if name in found]
    cols = [(label.replace("@long", f"@{step}"), name, step) for label, name, step in cols]
    for model in models:
        mr, ar = {"model": model}, {"model": model}
        for label, name, step in cols:
            seeds = found[name]
            m = {s: msgr_at(c, model, step, ext) for s, c in seeds.items()}
            mr[label] = "0 (reference)" if model == BASELINE else fmt(m.values(), 100)
            ar[label] = fmt([accuracy_at(c, model, step) for c in seeds.values()], 100, 0)
            per_seed.setdefault(label, {})[model] = m
        msgr_rows.append(mr)
        acc_rows.append(ar)
    text = (f"### MSGR (%, {ext} similarity; higher = better protection), mean ± 95% CI over seeds\n\n"
            + markdown_table(msgr_rows) + "\n### oracle accuracy on the targets (%, lower = better protection)\n\n"
            + markdown_table(acc_rows))
    return text, per_seed


def mima_vs_best(cfg, per_seed: dict) -> tuple[str, list[dict]]:
    """Per column and over all columns: MIMA minus the baseline with the highest mean MSGR, paired by seed."""
    baselines = [m for m in cfg.immunize.methods if m != IMMUNIZED_FIRST]
    if IMMUNIZED_FIRST not in cfg.immunize.methods or not baselines or not per_seed:
        return "", []
    overall: dict = {m: {} for m in [IMMUNIZED_FIRST] + baselines}
    columns = dict(per_seed)
    shared = set.intersection(*(set(v[IMMUNIZED_FIRST]) for v in columns.values()))
    for m in overall:
        overall[m] = {s: float(np.mean([columns[c][m][s] for c in columns])) for s in shared}
    columns["mean over the columns"] = overall
    rows = []
    for label, by_model in columns.items():
        row = paired_mima_row(by_model, baselines)
        rows.append({"column": label, **row})
    return (f"### MIMA minus the best baseline (MSGR points, paired by seed, 95% CI)\n\n" + markdown_table(
        [{k: (("n/a (one seed)" if math.isnan(v) else f"{v:.2f}") if isinstance(v, float) else v)
          for k, v in r.items()} for r in rows]), rows)


def paired_mima_row(by_model: dict, baselines: list[str]) -> dict:
    """{seed: MSGR} per method -> the best baseline (highest mean) and MIMA minus it, paired by seed."""
    best = max(baselines, key=lambda m: np.mean(list(by_model[m].values())))
    mean, half = paired_difference({s: 100 * v for s, v in by_model[IMMUNIZED_FIRST].items()},
                                   {s: 100 * v for s, v in by_model[best].items()})
    return {"best_baseline": best, "difference": mean, "ci95": half, "seeds": len(by_model[best])}


def curves(cfg, found: dict, cells, folder: Path) -> tuple[str, Path | None]:
    """Target accuracy over steps per model (mean ± CI over seeds, one panel per attack cell) and the steps to
    re-learn of the mean curve (first step >= grid.relearn_threshold)."""
    rows, table, th = [], [], cfg.grid.relearn_threshold
    names = [c.name for c in cells if c.name in found]
    for model in _models(cfg):
        trow = {"model": model}
        for name in names:
            seeds = found[name]
            steps = next(iter(seeds.values()))["steps"]
            mean_curve, reached = {}, 0
            for step in steps:
                vals = [accuracy_at(c, model, step) for c in seeds.values()]
                if any(v is None for v in vals):
                    break
                mean, half = confidence_interval(vals)
                mean_curve[step] = mean
                rows.append({"metric": "ACC", "method": model, "concept": name, "step": step, "mean": mean,
                             "ci95": half})
            if not mean_curve:
                continue
            for c in seeds.values():
                own = {s: accuracy_at(c, model, s) for s in steps}
                reached += steps_to_relearn(own, th) is not None
            hit = steps_to_relearn(mean_curve, th)
            trow[name] = (f"{hit}" if hit is not None else f"not within {max(mean_curve)}") + \
                f" ({reached}/{len(seeds)} seeds)"
        table.append(trow)
    if not rows:
        return "", None
    path = folder / "accuracy_curves.png"
    plot_similarity_curves(rows, metric="ACC", concepts=names, path=path,
                           title="oracle accuracy on the targets (mean over targets; 95% CI over seeds)")
    text = (f"### steps to re-learn (first step at which the seed-mean target accuracy reaches {th:.0%}; in "
            f"brackets the seeds whose own curve reaches it)\n\n" + markdown_table(table)
            + f"\n![accuracy over steps]({path.name})\n")
    return text, path


def utility_table(cfg, found: dict) -> str:
    seeds = found.get("utility")
    if not seeds:
        return ""
    first = next(iter(seeds.values()))
    rows = []
    for model in first["models"]:
        row = {"model": model}
        for scope in ("same", "other"):
            names = [c for c, s in first["scope"].items() if s == scope]
            if names:
                vals = [float(np.mean([c["accuracy"][model][n] for n in names])) for c in seeds.values()]
                row[f"{scope} kind ({', '.join(names)})"] = fmt(vals, 100, 0)
        rows.append(row)
    return ("### utility: oracle accuracy (%) on non-target concepts of the targets' kind and of the other kind, "
            f"{first['n_images']} generations each\n\n" + markdown_table(rows))


def benign_table(cfg, found: dict) -> str:
    seeds = found.get("benign-lora")
    if not seeds:
        return ""
    first = next(iter(seeds.values()))
    last = max(first["steps"])
    ref = BASE if BASE in first["models"] else BASELINE
    rows = []
    for model in first["models"]:
        acc = {s: accuracy_at(c, model, last) for s, c in seeds.items()}
        row = {"model": model, f"accuracy @{last} (%)": fmt(acc.values(), 100, 0)}
        if model != ref:
            base = {s: accuracy_at(c, ref, last) for s, c in seeds.items()}
            mean, half = paired_difference({s: 100 * v for s, v in acc.items()}, {s: 100 * v for s, v in base.items()})
            row[f"minus {ref} (points, paired)"] = f"{mean:.0f}" + ("" if math.isnan(half) else f" ± {half:.0f}")
        rows.append(row)
    return (f"### harmless fine-tuning: LoRA on {', '.join(first['concepts'])} (held out; it should succeed on "
            f"the immunized models as on the {ref} model)\n\n" + markdown_table(rows))


def write_grid_report(cfg, root: Path, cells) -> Path:
    from .grid import grid_seeds

    folder = Path(root) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in cells] + (["benign-lora"] if cfg.evaluate.benign_concepts else []) + \
        (["utility"] if cfg.utility_concepts else [])
    found, missing = load_cells(cfg, root, names)
    seeds = grid_seeds(cfg)
    parts = [f"# Grid report: {cfg.experiment}\n",
             f"Task: {cfg.task}; targets: {', '.join(cfg.concepts)}; seeds: {seeds}; attack cells: "
             f"{', '.join(c.name for c in cells)}; {cfg.attack.n_images} generations per snapshot and target.\n"]
    if missing:
        parts.append(f"**Unfinished cells ({len(missing)}), left out below:** {', '.join(missing)}\n")
    summary: dict = {"seeds": seeds, "missing": missing, "seconds": {
        n: {str(s): c.get("seconds") for s, c in per.items()} for n, per in found.items()}}
    plain = [c for c in cells if not c.is_variant and c.name in found]
    if plain:
        text, per_seed = paper_tables(cfg, found, cells)
        parts.append(f"## The paper's table (report step {cfg.grid.report_step})\n\n" + text)
        vs_text, vs_rows = mima_vs_best(cfg, per_seed)
        parts.append(vs_text)
        summary["mima_vs_best"] = vs_rows
        summary["msgr_per_seed"] = per_seed
    strong = [c for c in cells if c.is_variant and c.name in found]
    if strong:
        ext, rows = _extractor(cfg), []
        for model in _models(cfg):
            row = {"model": model}
            for c in strong:
                for step in sorted({cfg.grid.report_step, _step(found[c.name], None)}):
                    vals = [msgr_at(x, model, step, ext) for x in found[c.name].values()]
                    accs = [accuracy_at(x, model, step) for x in found[c.name].values()]
                    row[f"{c.name} @{step}"] = ("" if model == BASELINE else f"MSGR {fmt(vals, 100)}; ") + \
                        f"acc {fmt(accs, 100, 0)}"
            rows.append(row)
        parts.append("## Stronger attackers (MSGR %, target accuracy %)\n\n" + markdown_table(rows))
    text, _ = curves(cfg, found, cells, folder)
    if text:
        parts.append("## Long horizon: target accuracy over steps\n\n" + text)
    util = utility_table(cfg, found) + "\n" + benign_table(cfg, found)
    if util.strip():
        parts.append("## Utility\n\n" + util)
    grids = [(n, cell_dir(root, min(per), n) / "grid.png") for n, per in found.items()
             if (cell_dir(root, min(per), n) / "grid.png").exists()]
    if grids:
        parts.append("## Image grids (rows: models; columns: snapshot steps; first target, first seed)\n\n" +
                     "\n".join(f"{n}: ![{n}]({Path('..') / p.relative_to(root)})" for n, p in grids) + "\n")
    per_cell = [v for per in summary["seconds"].values() for v in per.values() if v]
    prepare = [json.loads(f.read_text())["seconds"] for f in sorted((Path(root) / "cells").glob("seed*/prepare.json"))]
    summary["prepare_seconds"] = prepare
    parts.append(f"Compute: {len(per_cell)} finished cells, {sum(per_cell):.0f} s in the cells; stages 01-03: "
                 f"{sum(prepare):.0f} s over {len(prepare)} seed(s) (when they first ran).\n")
    report = folder / "report.md"
    atomic_write_text(report, "\n".join(parts))
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=1, sort_keys=True, default=str))
    return report
