"""Evaluation: similarity curves, SGR / MSGR with confidence intervals, utility checks, and result tables.

Definitions (IMMA / MIMA, see PAPER_NOTES "Metrics"):
- M(ref, gen): mean similarity over all (reference image, generated image) pairs, from a feature extractor
  (CLIP or DINO cosine, 1 - LPIPS, or the toy oracle's embedding; see `features`).
- SGR at an adaptation step = (M_without - M_with) / M_without, where M_without is measured on the attacked model
  that was not immunized and M_with on the attacked immunized model. Higher = better protection; 0 = no effect.
- MSGR = mean of SGR over the target concepts.

Curves are plain dicts, `{method: {concept: {step: M}}}`, one per experiment seed; the method named `baseline`
(default "no defense") is the attacked-without-immunization run every other method is compared with.
Tables are lists of dicts (one row per observation), written as CSV and markdown by `write_table`.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

BASELINE = "no defense"
Curves = dict  # {method: {concept: {step: M}}}
Scorer = Callable  # (images, prompts, concept=None) -> np.ndarray, one score per image


# ---------------------------------------------------------------- similarity and SGR
def similarity_matrix(ref, gen, extractor) -> torch.Tensor:
    """(len(ref), len(gen)) similarities under the extractor."""
    return extractor.similarity(ref, gen)


def mean_pairwise_similarity(ref, gen, extractor) -> float:
    """M: mean similarity over all reference x generated pairs."""
    return float(similarity_matrix(ref, gen, extractor).double().mean())


def similarity_curve(ref, snapshots, extractor) -> dict[int, float]:
    """{step: M(ref, snapshot images)} for an attack's snapshots (an AttackResult or {step: images})."""
    snapshots = getattr(snapshots, "snapshots", snapshots)
    if not snapshots:
        raise ValueError("similarity_curve: the attack has no snapshots; run it with snapshot_steps=(...)")
    if hasattr(extractor, "embed"):  # embed the references once
        e_ref = extractor.embed(ref)
        return {int(s): float((e_ref @ extractor.embed(snapshots[s]).T).double().mean()) for s in sorted(snapshots)}
    return {int(s): mean_pairwise_similarity(ref, snapshots[s], extractor) for s in sorted(snapshots)}


def collect_curves(refs: Mapping[str, object], runs: Mapping[str, Mapping[str, object]], extractor) -> Curves:
    """refs {concept: reference images}, runs {method: {concept: AttackResult or snapshots}} -> curves."""
    missing = {c for r in runs.values() for c in r} - set(refs)
    if missing:
        raise KeyError(f"collect_curves: no reference images for concepts {sorted(missing)}")
    return {m: {c: similarity_curve(refs[c], res, extractor) for c, res in per.items()} for m, per in runs.items()}


def sgr(m_without: float, m_with: float) -> float:
    """Similarity gap ratio (M_without - M_with) / M_without; positive when immunization lowers similarity."""
    if not m_without > 0:
        raise ValueError(f"SGR is undefined for M_without = {m_without:.4g} <= 0 (it is a ratio to the "
                         "un-immunized similarity); use an extractor with positive similarities (CLIP, 1-LPIPS)")
    return (m_without - m_with) / m_without


def msgr(sgr_by_concept: Mapping[str, float] | Sequence[float]) -> float:
    """Mean SGR over concepts."""
    vals = list(sgr_by_concept.values()) if isinstance(sgr_by_concept, Mapping) else list(sgr_by_concept)
    if not vals:
        raise ValueError("msgr: no concepts")
    return float(np.mean(vals))


def confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the Student-t confidence interval; the half-width is nan for one value."""
    from scipy import stats

    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        raise ValueError("confidence_interval: no values")
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan")
    sem = float(x.std(ddof=1) / math.sqrt(x.size))
    return mean, float(stats.t.ppf(0.5 + level / 2, x.size - 1) * sem)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of a - b paired by seed: the interval of the per-seed differences, narrower than
    the two methods' own intervals when the seeds move both alike (a hard data draw is hard for every
    method). Both must hold the same seeds."""
    if set(a) != set(b):
        raise ValueError(f"paired_difference: seeds differ ({sorted(a)} vs {sorted(b)}); pair the same seeds")
    return confidence_interval([a[s] - b[s] for s in sorted(a)], level)


def steps_to_relearn(curve: Mapping[int, float], threshold: float = 0.6) -> int | None:
    """The first snapshot step at which a target's accuracy reaches ``threshold`` (None: not within the
    curve's last step). It tells protection that holds from protection that only delays the attacker."""
    if not curve:
        raise ValueError("steps_to_relearn: empty curve")
    return next((step for step in sorted(curve) if curve[step] >= threshold), None)


def _seed_list(curves_by_seed) -> list[Curves]:
    runs = list(curves_by_seed.values()) if isinstance(curves_by_seed, Mapping) else list(curves_by_seed)
    if not runs:
        raise ValueError("sgr_table: no seeds")
    return runs


def _row(extractor, method, concept, step, metric, values) -> dict:
    mean, half = confidence_interval(values)
    return {"extractor": extractor, "method": method, "concept": concept, "step": step, "metric": metric,
            "mean": mean, "ci95": half, "n": len(values)}


def sgr_table(curves_by_seed, baseline: str = BASELINE, extractor: str = "") -> list[dict]:
    """Tidy rows (metric M, SGR, MSGR) with mean and 95% CI over seeds.

    curves_by_seed: {seed: curves} or a list of curves, where curves = {method: {concept: {step: M}}}. Each seed's
    SGR compares a method with that seed's baseline run; MSGR averages SGR over concepts within a seed.
    """
    runs = _seed_list(curves_by_seed)
    first = runs[0]
    if baseline not in first:
        raise KeyError(f"sgr_table: no baseline run {baseline!r}; methods are {list(first)}")
    for i, run in enumerate(runs):
        if set(run) != set(first) or any(set(run[m]) != set(first[m]) for m in first):
            raise ValueError(f"sgr_table: seed #{i} has other methods/concepts than seed #0; align the runs")
    rows = []
    for method, per_concept in first.items():
        msgr_vals: dict[int, list[float]] = {}
        for concept, curve in per_concept.items():
            for step in sorted(curve):
                ms = [run[method][concept][step] for run in runs]
                rows.append(_row(extractor, method, concept, step, "M", ms))
                if method == baseline:
                    continue
                try:
                    base = [run[baseline][concept][step] for run in runs]
                except KeyError as err:
                    raise KeyError(f"sgr_table: baseline {baseline!r} lacks concept {concept!r} step {step}") from err
                sg = [sgr(b, m) for b, m in zip(base, ms)]
                rows.append(_row(extractor, method, concept, step, "SGR", sg))
                for i, v in enumerate(sg):
                    msgr_vals.setdefault(step, [0.0] * len(runs))[i] += v / len(per_concept)
        full = [s for s in msgr_vals if all(s in c for c in per_concept.values())]  # steps every concept has
        rows += [_row(extractor, method, "all", s, "MSGR", msgr_vals[s]) for s in sorted(full)]
    order = {"M": 0, "SGR": 1, "MSGR": 2}
    return sorted(rows, key=lambda r: order[r["metric"]])  # stable: methods, concepts, steps keep their order


def paper_table(rows: list[dict], step: int, metric: str = "SGR", percent: bool = True) -> list[dict]:
    """Pivot of sgr_table rows at one step: one row per concept (+ MSGR), one 'mean ± ci' column per method."""
    scale = 100.0 if percent and metric != "M" else 1.0
    picked = [r for r in rows if r["step"] == step and r["metric"] in (metric, "MSGR" if metric == "SGR" else None)]
    if not picked:
        raise ValueError(f"paper_table: no {metric} rows at step {step}")
    methods = list(dict.fromkeys(r["method"] for r in picked))
    out: dict[str, dict] = {}
    for r in picked:
        name = "MSGR" if r["metric"] == "MSGR" else r["concept"]
        cell = f"{scale * r['mean']:.2f}"
        if not math.isnan(r["ci95"]):
            cell += f" ± {scale * r['ci95']:.2f}"
        out.setdefault(name, {"concept": name, **{m: "" for m in methods}})[r["method"]] = cell
    return list(out.values())


# ---------------------------------------------------------------- tables
def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], folder, name: str) -> tuple[Path, Path]:
    """Write rows as folder/name.csv (full precision) and folder/name.md (4 significant digits)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    csv_path, md_path = folder / f"{name}.csv", folder / f"{name}.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    md_path.write_text(markdown_table(rows))
    return csv_path, md_path


def read_table(path) -> list[dict]:
    """Read a CSV written by write_table back (numbers as floats/ints)."""
    def conv(v):
        for t in (int, float):
            try:
                return t(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as f:
        return [{k: conv(v) for k, v in r.items()} for r in csv.DictReader(f)]


# ---------------------------------------------------------------- utility
def clip_scorer(extractor) -> Scorer:
    """Per-image CLIP score of each image to its prompt (a ClipExtractor)."""
    return lambda images, prompts, concept=None: extractor.clip_score(images, prompts).numpy()


def score_generations(pipe, prompts: Mapping[str, str], seeds: Sequence[int], scorer: Scorer,
                      steps: int = 25, guidance: float = 5.0) -> dict[str, np.ndarray]:
    """Generate len(seeds) images per {concept: prompt} and score each; {concept: per-image scores}."""
    from ..method.diffusion import generate

    names = list(prompts)
    images = generate(pipe, [prompts[c] for c in names for _ in seeds], [s for _ in names for s in seeds],
                      steps=steps, guidance=guidance)
    n = len(seeds)
    return {c: np.asarray(scorer(images[i * n:(i + 1) * n], [prompts[c]] * n, c)) for i, c in enumerate(names)}


def _compare(check, concept, step, metric, base, imm) -> dict:
    bm, bh = confidence_interval(base)
    im, ih = confidence_interval(imm)
    return {"check": check, "concept": concept, "step": step, "metric": metric, "base_mean": bm, "base_ci95": bh,
            "immunized_mean": im, "immunized_ci95": ih, "change": im - bm,
            "ratio": im / bm if bm else float("nan"), "n": len(imm)}


def generation_utility(base: Mapping[str, np.ndarray], immunized: Mapping[str, np.ndarray],
                       metric: str = "score") -> list[dict]:
    """Rows comparing per-image scores of non-target concepts before vs after immunization."""
    return [_compare("generation", c, "", metric, base[c], immunized[c]) for c in base]


def finetune_utility(base_runs: Mapping[str, object], immunized_runs: Mapping[str, object], scorer: Scorer,
                     metric: str = "score") -> list[dict]:
    """Harmless fine-tuning: the same attack on a non-target concept, on the base vs the immunized model.

    Runs are {concept: AttackResult}; every snapshot step both runs share gets one row (the last one is the
    verdict: ratio near 1 means fine-tuning works as well after immunization).
    """
    rows = []
    for c, b in base_runs.items():
        i = immunized_runs[c]
        for step in sorted(set(b.snapshots) & set(i.snapshots)):
            rows.append(_compare("finetune", c, step, metric, scorer(b.snapshots[step], b.snapshot_prompts, c),
                                 scorer(i.snapshots[step], i.snapshot_prompts, c)))
    return rows


def utility_report(base_scores=None, immunized_scores=None, base_runs=None, immunized_runs=None,
                   scorer: Scorer | None = None, metric: str = "score") -> list[dict]:
    """Both utility checks in one table: generation of non-target concepts, and harmless fine-tuning."""
    rows = []
    if base_scores is not None:
        rows += generation_utility(base_scores, immunized_scores, metric)
    if base_runs is not None:
        if scorer is None:
            raise ValueError("utility_report: fine-tuning runs need a scorer (clip_scorer, or the toy world's oracle_scorer)")
        rows += finetune_utility(base_runs, immunized_runs, scorer, metric)
    return rows
