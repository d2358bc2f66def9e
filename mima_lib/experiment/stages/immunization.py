"""Stage 03, immunization: MIMA and the IMMA-inspired baselines, each from the erased (or base) model.

Every method writes only the parameters it changed (S_u) with its settings and per-step losses.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ...method.immunize import immunize as run_immunize
from ...method.immunize import save_immunized
from ..artifacts import remove_stale_temporaries, write_manifest
from ..config import ExperimentConfig, immunize_config, merge_captions, slug, stage_settings
from ..progress import Progress
from .common import log, must_run, starting_pipeline
from .data import load_data


@dataclass
class ImmunizeStageResult:
    cfg: ExperimentConfig
    folder: Path
    runs: dict  # method -> immunize.json content (+ losses)

    def summary(self) -> None:
        for m, info in self.runs.items():
            ex = info.get("final_extras", {})
            log(f"{m:>16s}: {info['steps_run']} steps, {info['seconds_per_step']:.2f} s/step, "
                f"final upper loss {ex.get('target', float('nan')):.4f}")


def immunize(cfg: ExperimentConfig, run_dir: Path, force: bool = False) -> ImmunizeStageResult:
    data = load_data(cfg, run_dir)
    concept_images = {cfg.concept(c).attack_prompt: data.images[c]["immunize"] for c in cfg.concepts}
    reg = {p: ims for p, ims in data.regularization.items() if ims}
    runs = {}
    for method in cfg.immunize.methods:
        folder = Path(run_dir) / "immunized" / slug(method)
        icfg = immunize_config(cfg, method)
        settings = {**stage_settings(cfg, "erase", "data"), "immunize": asdict(icfg)}
        if must_run(folder, settings, force):
            log(f"immunizing with {method}")
            remove_stale_temporaries(folder)  # what a killed earlier try left (its checkpoint stays)
            pipe = starting_pipeline(cfg, run_dir)
            total = icfg.steps * (len(concept_images) if method == "imma-sequential" else 1)
            bar = Progress(f"immunize {method}, step", total, log)  # a line per tenth of the steps, with ETA
            result = run_immunize(pipe, concept_images, reg or None, None, icfg,
                                  checkpoint_dir=folder / "checkpoint", reg_captions=merge_captions(cfg),
                                  on_step=bar.update)
            save_immunized(result, folder)
            (folder / "losses.json").write_text(json.dumps({"losses": result.losses, "extras": result.extras}))
            write_manifest(folder, settings, icfg.seed)
        info = json.loads((folder / "immunize.json").read_text())
        info.update(json.loads((folder / "losses.json").read_text()))
        runs[method] = info
    return ImmunizeStageResult(cfg, Path(run_dir) / "immunized", runs)


def show_immunization(res: ImmunizeStageResult, path: str | Path | None = None):
    """Upper-level loss of the merged (or adapted) model per step, one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m, info in res.runs.items():
        target = [e.get("target", float("nan")) for e in info["extras"]]
        ax.plot(range(1, len(target) + 1), target, label=m)
    ax.set_xlabel("immunization step")
    ax.set_ylabel("attacked-model loss on targets")
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
