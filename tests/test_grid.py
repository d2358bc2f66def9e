"""The seed grid (issue #15): the report's statistics over seeds on constructed cells (known answers), the
paired MIMA-vs-best-baseline sign, early errors, and a smoke-sized grid that runs, is killed and resumes."""
import json
import math
import os
from pathlib import Path

import pytest
from scipy import stats

from mima_lib.experiment.dataclass_yaml import ConfigError

PARAMS = Path(__file__).resolve().parent.parent / "papermill_params"
SMOKE = PARAMS / "smoke_grid.yaml"


def _fake_cell(root: Path, seed: int, name: str, m_with: dict, acc: dict, steps=(0, 40)) -> None:
    """A finished attack cell as grid_cells writes it: M per model (no defense M = 1, so SGR = 1 - M)."""
    from mima_lib.experiment.artifacts import write_manifest
    from mima_lib.experiment.grid_cells import CELL_FILE, cell_dir

    results = {}
    for model, m in {"no defense": 1.0, **m_with}.items():
        results[model] = {"cat": {"M": {"oracle": {str(s): (1.0 if s == 0 else m) for s in steps}},
                                  "accuracy": {str(s): (0.0 if s == 0 else acc.get(model, 0.0)) for s in steps}}}
    folder = cell_dir(root, seed, name)
    folder.mkdir(parents=True)
    payload = {"kind": "attack", "cell": name, "attack": name, "seed": seed, "concepts": ["cat"],
               "models": list(results), "results": results, "steps": list(steps), "seconds": 1.0}
    (folder / CELL_FILE).write_text(json.dumps(payload))
    write_manifest(folder, {"fake": True}, seed)


def _grid_cfg(seeds, methods=("mima", "imma-sequential", "imma-joint")):
    from mima_lib.experiment.grid import load_grid

    return load_grid(SMOKE, [f"seeds={list(seeds)}", f"immunize.methods={list(methods)}",
                             "attack.methods=[lora]", "grid.variants=[]", "grid.report_step=40",
                             "attack.settings={lora: {steps: 40, snapshot_steps: [0, 40]}}"])


def test_report_ci_over_seeds_known_answer(tmp_path):
    """MIMA's SGR is 0.1, 0.2, 0.3 over three seeds: mean 20.0, half-width t(0.975, 2) * 10 / sqrt(3) = 24.8."""
    from mima_lib.experiment.grid_report import write_grid_report

    cfg, cells = _grid_cfg([0, 1, 2])
    for seed, sg in zip([0, 1, 2], [0.1, 0.2, 0.3]):
        _fake_cell(tmp_path, seed, "lora", {"mima": 1 - sg, "imma-sequential": 0.95, "imma-joint": 0.9},
                   {"mima": 0.25 * seed})
    text = write_grid_report(cfg, tmp_path, cells).read_text()
    half = stats.t.ppf(0.975, 2) * 10 / math.sqrt(3)
    assert f"{half:.1f}" == "24.8"
    mima_row = next(line for line in text.splitlines() if line.startswith("| mima |"))
    assert mima_row.startswith(f"| mima | 20.0 ± {half:.1f} |")  # the MSGR table comes first
    acc_row = [line for line in text.splitlines() if line.startswith("| mima |")][1]
    assert f"25 ± {stats.t.ppf(0.975, 2) * 25 / math.sqrt(3):.0f}" in acc_row  # accuracy 0, 25, 50%
    assert "imma-sequential | 5.0 ± 0.0" in text  # identical seeds: a zero-width interval


@pytest.mark.parametrize("mima_better", [True, False])
def test_mima_minus_best_baseline_sign(tmp_path, mima_better):
    """The best baseline is the one with the higher mean MSGR (imma-joint here); MIMA minus it, paired by seed,
    is positive when MIMA beats it in every seed and negative when it loses in every seed."""
    from mima_lib.experiment.grid_report import write_grid_report

    cfg, cells = _grid_cfg([0, 1, 2])
    for seed in (0, 1, 2):
        joint = 0.7 - 0.1 * seed  # SGR 0.3, 0.4, 0.5: a hard seed is hard for both methods
        mima = joint - (0.05 if mima_better else -0.05)  # M: lower M = higher SGR
        _fake_cell(tmp_path, seed, "lora", {"mima": mima, "imma-sequential": 0.99, "imma-joint": joint}, {})
    write_grid_report(cfg, tmp_path, cells)
    rows = json.loads((tmp_path / "report" / "summary.json").read_text())["mima_vs_best"]
    row = next(r for r in rows if r["column"] == "lora @40")
    assert row["best_baseline"] == "imma-joint"
    assert row["difference"] == pytest.approx(5.0 if mima_better else -5.0)
    assert row["ci95"] == pytest.approx(0.0, abs=1e-9)  # the same gap in every seed: paired CI of width 0
    assert row["seeds"] == 3


def test_report_lists_unfinished_cells(tmp_path):
    from mima_lib.experiment.grid_report import write_grid_report

    cfg, cells = _grid_cfg([0, 1])
    _fake_cell(tmp_path, 0, "lora", {"mima": 0.8, "imma-sequential": 0.9, "imma-joint": 0.9}, {})
    text = write_grid_report(cfg, tmp_path, cells).read_text()
    assert "seed 1 / lora" in text and "| mima | 20.0 |" in text  # one seed: a mean, no interval


@pytest.mark.parametrize("override, message", [
    ("seeds=[]", "seeds: the list is empty"),
    ("seeds=[0, 0]", "duplicate seeds"),
    ("grid.variants=[lora-lr3]", "unknown attack variant"),
    ("grid.variants=[textual_inversion-rank8]", "only LoRA has a rank"),
    ("grid.variants=[dreambooth-lr2x]", "not in attack.methods"),
    ("grid.report_step=3", "not a snapshot step"),
])
def test_bad_grid_fails_before_work(tmp_path, override, message):
    from mima_lib.experiment.grid import run_grid

    with pytest.raises(ConfigError, match=message):
        run_grid(SMOKE, run_root=tmp_path, overrides=[override], log=lambda m: None)
    assert not any(tmp_path.iterdir())  # nothing was written


def test_variant_settings():
    from mima_lib.experiment.grid import load_grid
    from mima_lib.experiment.variants import cell_settings

    cfg, cells = load_grid(SMOKE, ["grid.variants=[lora-lr3x, lora-rank16]", "grid.variant_steps=2"])
    by_name = {c.name: cell_settings(cfg, c, 5) for c in cells}
    assert by_name["lora-lr3x"]["lr"] == pytest.approx(3 * 3e-3)  # the toy LoRA's lr, x3
    assert by_name["lora-rank16"]["rank"] == 16 and "lr" not in by_name["lora-rank16"]
    assert by_name["lora-rank16"]["steps"] == 2 and by_name["lora-rank16"]["snapshot_steps"] == [0, 2]
    assert by_name["lora"]["steps"] == 4 and by_name["lora"]["seed"] == 5  # the plain attack is untouched


def test_the_harmless_fine_tune_has_its_own_horizon_in_both_paths():
    """evaluate.benign_steps sets the boat LoRA's steps in the notebook path (stages.attack) and in the grid's
    benign cell alike; the targets' LoRA keeps the file's steps. default.yaml's 100: 60 steps read boat at
    50% on a held-out seed with or without a defense (issue #14)."""
    from mima_lib.experiment.grid_cells import benign_cell
    from mima_lib.experiment.loading import load_experiment
    from mima_lib.experiment.stages.attack import _settings, run_settings
    from mima_lib.experiment.variants import cell_settings

    cfg = load_experiment(PARAMS / "default.yaml")
    boat, cat = run_settings(cfg, "boat", "lora", 1), run_settings(cfg, "cat", "lora", 1)
    assert boat["steps"] == 100 and boat["snapshot_steps"] == [0, 20, 40, 60, 100] and boat["seed"] == 1
    assert cat["steps"] == 60 and cat["snapshot_steps"] == [0, 20, 40, 60]
    assert cell_settings(cfg, benign_cell(), 1) == boat
    assert _settings(cfg, "boat", "lora", 1)["attack_settings"] == boat  # the manifest records it: a change reruns
    unset = load_experiment(PARAMS / "default.yaml", ["evaluate.benign_steps=null"])
    assert run_settings(unset, "boat", "lora", 1) == run_settings(unset, "cat", "lora", 1)


def _mtimes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("cell.json")}


@pytest.mark.slow
def test_smoke_grid_runs_and_resumes_after_a_kill(tmp_path):
    """2 seeds, 2 attacks (+ a LoRA variant, the harmless fine-tune and utility) at tiny budgets. A cell that
    raises stops the grid (the kill); the rerun skips the finished cells (their files keep their mtimes) and
    finishes the rest. A finished cell whose manifest is gone is redone, reusing its finished attack runs."""
    from mima_lib.experiment.grid import run_grid

    class Killed(RuntimeError):
        pass

    done = []

    def kill_after_two(name):
        done.append(name)
        if len(done) == 2:
            raise Killed(name)

    with pytest.raises(Killed):
        run_grid(SMOKE, run_root=tmp_path, log=lambda m: None, after_cell=kill_after_two)
    root = tmp_path / "smoke_grid"
    first = _mtimes(root)
    assert sorted(first) == ["cells/seed0/lora/cell.json", "cells/seed0/textual_inversion/cell.json"]
    assert not (root / "seed1").exists()  # seed 1 never started

    ran = []
    report = run_grid(SMOKE, run_root=tmp_path, log=ran.append)
    second = _mtimes(root)
    assert all(second[k] == v for k, v in first.items())  # finished cells were not recomputed
    assert len(second) == 2 * 5  # lora, textual_inversion, lora-rank16, benign-lora, utility per seed
    assert sum("seed 0: cell" in m for m in ran) == 3 and sum("seed 1: cell" in m for m in ran) == 5

    text = report.read_text()
    for needle in ("| mima |", "| imma-joint |", "lora @2", "textual_inversion @2", "lora @4", "MIMA minus the best",
                   "lora-rank16 @2", "steps to re-learn", "same kind (flower)", "other kind (katsushika hokusai)",
                   "LoRA on boat", "minus base"):
        assert needle in text, needle
    assert "Unfinished" not in text
    assert (root / "report" / "accuracy_curves.png").stat().st_size > 0

    # the other kill: a finished cell lost its manifest (killed between its files and its marker)
    snaps = sorted((root / "seed1" / "attacks").rglob("lora/seed1/snapshots.safetensors"))
    assert len(snaps) == 3  # no defense, mima, imma-joint
    snap_times = [p.stat().st_mtime_ns for p in snaps]
    os.remove(root / "cells" / "seed1" / "lora" / "manifest.json")
    ran = []
    run_grid(SMOKE, run_root=tmp_path, log=ran.append)
    third = _mtimes(root)
    redone = "cells/seed1/lora/cell.json"
    assert third[redone] > second[redone]
    assert all(third[k] == v for k, v in second.items() if k != redone)
    assert [p.stat().st_mtime_ns for p in snaps] == snap_times  # its attack runs were reused, not re-trained
    assert [m for m in ran if ": cell " in m] == [m for m in ran if m.startswith("seed 1: cell lora ")]

    # --force on one cell whose attack settings changed: its attack runs start anew (the runs made with the
    # old settings are removed, not refused for their manifests); the other cells stay as they were
    from mima_lib.experiment.grid import load_grid, run_seed

    ti = sorted((root / "seed1" / "attacks").rglob("textual_inversion/seed1/snapshots.safetensors"))
    ti_times = [p.stat().st_mtime_ns for p in ti]
    cfg, cells = load_grid(SMOKE, ["attack.settings.textual_inversion.num_vectors=2"])
    status = run_seed(cfg, cells, root, 1, force=True, log=lambda m: None, only={"textual_inversion"})
    assert status == {"textual_inversion": "ran"}
    assert all(p.stat().st_mtime_ns > t for p, t in zip(ti, ti_times)), "the forced cell reused old runs"
    assert _mtimes(root)["cells/seed1/lora/cell.json"] == third["cells/seed1/lora/cell.json"]


def test_data_draws_move_with_the_seed():
    """Each seed draws its own renders (seed 0 keeps the single-seed files' draws); the held-out benign concept
    is rendered even when the targets come from the model."""
    import numpy as np

    from mima_lib.experiment.grid import load_grid
    from mima_lib.experiment.grid_cells import seed_config
    from mima_lib.experiment.stages.data import _concept_images
    from mima_lib.toy import world

    cfg, _ = load_grid(SMOKE, ["data.source=model"])
    draws = {s: _concept_images(seed_config(cfg, s), None, "boat", 0) for s in (0, 1)}
    assert np.array_equal(np.asarray(draws[0]["attack"][0]), np.asarray(world.render("boat", 20_000)))
    assert not np.array_equal(np.asarray(draws[0]["attack"][0]), np.asarray(draws[1]["attack"][0]))
    assert len(draws[1]["immunize"]) == cfg.data.immunization_images
