"""Test settings shared by every test module: offline hub, one thread per process, the slow marker."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail in 2 s instead of 49 s of retries
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("MIMA_TEST_THREADS", "2")))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a couple of minutes on 2 CPU cores")


@pytest.fixture(scope="session")
def toy_pipe_factory():
    """Load a fresh copy of the embedded toy model (each caller may modify its copy)."""
    from mima_lib.toy.model import load_toy_pipeline

    return lambda: load_toy_pipeline()


@pytest.fixture(scope="session")
def toy_oracle():
    from mima_lib.toy.oracle import load_toy_oracle

    return load_toy_oracle()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One uninterrupted run of the whole notebook sequence on papermill_params/smoke.yaml (about 2 minutes),
    shared by test_notebooks.py and test_resume_stages.py (the reference a killed-and-resumed run must equal).
    Tests may re-run stages in it, but must not change its outputs."""
    from pathlib import Path

    from mima_lib.experiment.run import run_sequence

    params = Path(__file__).resolve().parent.parent / "papermill_params" / "smoke.yaml"
    return run_sequence(params, run_root=tmp_path_factory.mktemp("runs"), log=lambda m: None)


@pytest.fixture(scope="session")
def sd_shaped(tmp_path_factory):
    """A random pipeline with Stable Diffusion v1-4's shape (real CLIP tokenizer, 77 tokens, 768-d, SD's block
    layout, 64 px) and tiny random CLIP / DINO evaluators, saved once: {'model': dir, 'evaluators': {...}}."""
    from mima_lib.testing.sd_shaped import save_evaluators, save_pipeline

    root = tmp_path_factory.mktemp("sd_shaped")
    return {"model": save_pipeline(root / "sd14_shaped"), "evaluators": save_evaluators(root / "eval")}


@pytest.fixture
def mima_then_lora(tmp_path):
    """Run a parameter file's stages (data, erasure when the task has it, MIMA, the LoRA attack, the report) in
    tmp_path; return (cfg, run_dir, target accuracy at ``step`` per model and concept, utility per concept and
    model) as the oracle reads them."""
    def run(params: dict, step: int):
        import yaml

        from mima_lib.evaluation.metrics import read_table
        from mima_lib.experiment import stages
        from mima_lib.experiment.config import run_dir_for
        from mima_lib.experiment.loading import load_experiment
        from mima_lib.toy.oracle import load_toy_oracle

        torch.set_num_threads(1)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        cfg = load_experiment(path)
        run_dir = run_dir_for(cfg, tmp_path / "runs")
        stages.make_data(cfg, run_dir)
        stages.erase(cfg, run_dir)  # nothing to do in personalization
        stages.immunize(cfg, run_dir)
        res = stages.attack(cfg, run_dir)
        report = stages.report(cfg, run_dir)
        oracle = load_toy_oracle()
        acc = {m: {c: oracle.accuracy(res.snapshots[(m, c, "lora", 0)][step], c) for c in cfg.concepts}
               for m in ("no defense", "mima")}
        util = {}
        for row in read_table(report.folder / "utility.csv"):
            util.setdefault(row["concept"], {})[row["model"]] = float(row["oracle_accuracy"])
        print(f"\ntarget accuracy at LoRA step {step}: {acc}\nutility: {util}")
        return cfg, run_dir, acc, util

    return run
