"""`seeds: [...]` in a notebook-sequence file (issue #15): the runner runs the whole sequence once per seed in
its own folder and reports over seeds. Known answers on constructed per-seed reports; early errors; and the
real sequence on two seeds of the smoke file, rerun to check that finished seeds are skipped."""
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from mima_lib.evaluation.metrics import write_table
from mima_lib.experiment.dataclass_yaml import ConfigError
from mima_lib.experiment.loading import load_experiment
from mima_lib.experiment.run import run_sequence, seed_parameters
from mima_lib.experiment.seed_summary import write_seed_summary

PARAMS = Path(__file__).resolve().parent.parent / "papermill_params"
SMOKE = PARAMS / "smoke.yaml"
MODELS = ["no defense", "mima", "imma-joint"]


def _fake_report(run_dir: Path, msgr: dict, acc: dict, utility: float, steps=(0, 4)) -> None:
    """One seed's report tables as stage 06 writes them: MSGR per model, the oracle's ACC per concept."""
    rows = []
    for model in MODELS:
        for step in steps:
            for concept in ("van gogh", "cat"):
                rows.append({"extractor": "oracle", "method": model, "concept": concept, "step": step,
                             "metric": "ACC", "mean": acc[model] if step else 0.0, "ci95": float("nan"), "n": 1})
            if model != "no defense":
                rows.append({"extractor": "oracle", "method": model, "concept": "all", "step": step,
                             "metric": "MSGR", "mean": msgr[model] if step else 0.0, "ci95": float("nan"), "n": 1})
    folder = run_dir / "report"
    write_table(rows, folder, "lora")
    write_table([{"model": m, "concept": "flower", "oracle_accuracy": utility} for m in MODELS], folder, "utility")


def _cfg():
    return load_experiment(SMOKE, ["seeds=[0, 1, 2]"])


def test_summary_known_answer(tmp_path):
    """MIMA's MSGR is 0.1, 0.2, 0.3 over three seeds: mean 20.0, half-width t(0.975, 2) * 10 / sqrt(3) = 24.8;
    imma-joint's is 0.05 lower on every seed, so MIMA minus the best baseline is +5.00 with a zero interval."""
    runs = {}
    for seed, m in zip((0, 1, 2), (0.1, 0.2, 0.3)):
        runs[seed] = tmp_path / f"seed{seed}"
        _fake_report(runs[seed], {"mima": m, "imma-joint": m - 0.05},
                     {"no defense": 1.0, "mima": 0.5 * seed, "imma-joint": 0.25}, utility=1.0 - 0.5 * (seed == 2))
    text = write_seed_summary(_cfg(), runs, tmp_path / "report").read_text()
    half = stats.t.ppf(0.975, 2) * 10 / math.sqrt(3)
    assert f"| mima | 20.0 ± {half:.1f} |" in text
    assert "MIMA minus the best baseline (imma-joint) at step 4: **5.00 MSGR points** ± 0.00" in text
    # steps to re-learn: no defense reaches 60% at step 4 on every seed; mima's seed-mean 50% does not, but
    # seed 2's own curve (100%) does
    assert "| no defense |  | 0 ± 0 | 100 ± 0 | 4 (3/3 seeds) |" in text
    assert "not within 4 (1/3 seeds)" in text
    assert "| 83 ± 72 |" in text  # utility 100, 100, 50: mean 83, half-width t * 28.9 / sqrt(3) = 72
    assert (tmp_path / "report" / "lora_accuracy_curves.png").stat().st_size > 1000


def test_summary_names_a_missing_seed_report(tmp_path):
    _fake_report(tmp_path / "seed0", {"mima": 0.1, "imma-joint": 0.1}, {m: 0.0 for m in MODELS}, 1.0)
    with pytest.raises(FileNotFoundError, match="seed 1's report"):
        write_seed_summary(_cfg(), {0: tmp_path / "seed0", 1: tmp_path / "seed1"}, tmp_path / "report")


def test_seed_parameters_give_each_seed_its_own_folder_and_draws():
    data = seed_parameters({"experiment": "x", "seeds": [3, 4], "attack": {"seeds": [0, 1]}}, 4)
    assert data == {"experiment": "x", "seed": 4, "run_subfolder": "seed4", "attack": {"seeds": [4]}}


@pytest.mark.parametrize("override, message", [
    ("seeds=[]", "seeds: the list is empty"),
    ("seeds=[1, 1]", "duplicate seeds"),
    ("seeds=[-1]", "negative seed"),
    ("run_subfolder=../elsewhere", "must be one folder name"),
])
def test_bad_seeds_fail_before_any_folder(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run_sequence(SMOKE, run_root=tmp_path / "runs", overrides=[override], log=lambda m: None)
    assert not (tmp_path / "runs").exists()


@pytest.mark.xdist_group("seed_runs")
def test_two_seeds_run_apart_and_resume(tmp_path, capfd):
    """The real sequence on two seeds (smoke budgets): each seed's folder has its own parameters, data draws
    and report; the report over seeds exists; a rerun skips every finished stage of both seeds."""
    from mima_lib.experiment.stages.data import load_data

    lines = []
    run_dir = run_sequence(SMOKE, run_root=tmp_path, overrides=["seeds=[0, 1]"], log=lines.append)
    assert run_dir == tmp_path / "smoke"
    cfgs = {s: load_experiment(run_dir / f"seed{s}" / "params.yaml") for s in (0, 1)}
    assert [(c.seed, c.attack.seeds, c.run_subfolder) for c in cfgs.values()] == [(0, [0], "seed0"), (1, [1], "seed1")]
    a0 = load_data(cfgs[0], run_dir / "seed0").images["cat"]["attack"]
    a1 = load_data(cfgs[1], run_dir / "seed1").images["cat"]["attack"]
    assert not any(np.array_equal(np.asarray(x), np.asarray(y)) for x in a0 for y in a1)  # each seed its own draws
    text = (run_dir / "report" / "report.md").read_text()
    assert "2 seeds ([0, 1])" in text and "MIMA minus the best baseline" in text and " ± " in text
    assert (run_dir / "seed1" / "report" / "report.md").exists()
    weights = run_dir / "seed1" / "immunized" / "mima" / "immunized.safetensors"
    before = weights.stat().st_mtime_ns
    lines.clear()
    run_sequence(SMOKE, run_root=tmp_path, overrides=["seeds=[0, 1]"], only=["03"], log=lines.append)
    assert weights.stat().st_mtime_ns == before
    assert sum("03_immunization done" in line for line in lines) == 2
    # the kernels are shut down without the interrupt that made each one print a KeyboardInterrupt "ERROR"
    assert "KeyboardInterrupt" not in capfd.readouterr().err


def test_a_seeds_file_opened_by_hand_runs_its_first_seed_where_the_runner_puts_it(tmp_path):
    """A learner opening 01_data.ipynb on a `seeds:` file (default.yaml) works in the runner's seed-0 folder."""
    from mima_lib.experiment.config import run_dir_for
    from mima_lib.experiment.loading import effective_parameters, load_run

    cfg = load_run(SMOKE, ["seeds=[5, 6]"])
    assert (cfg.seed, cfg.seeds, cfg.attack.seeds) == (5, None, [5])
    assert run_dir_for(cfg, tmp_path) == tmp_path / "smoke" / "seed5"
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(seed_parameters(effective_parameters(SMOKE, ["seeds=[5, 6]"]), 5)))
    assert load_run(path) == cfg
