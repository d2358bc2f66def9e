"""Every papermill_params/sd14_*.yaml runs end to end through `python -m mima_lib.experiment.run` on a random
model with Stable Diffusion v1-4's shape (mima_lib.testing.sd_shaped: the real CLIP tokenizer, 77 tokens,
768-d states, SD's block layout, 64 px), with only the model, the device and the sizes overridden.

Sizes: 2 of the file's concepts, 2 images per part, 2 steps of everything, one attack seed. The extractors are
the file's CLIP and DINO as tiny random models; LPIPS is left out because it cannot run here (torchvision does
not import beside the CPU torch wheel), which validation says before anything runs (tested below).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "papermill_params"

SIZES = ["device=cpu", "data.immunization_images=2", "data.attack_images=2", "data.reference_images=2",
         "data.regularization_images=2", "data.sample_steps=2", "data.batch_size=8",
         "immunize.settings.steps=2", "immunize.settings.checkpoint_every=0",
         "immunize.per_method.imma-sequential.steps=1", "attack.settings.lora.steps=2",
         "attack.settings.textual_inversion.steps=2", "attack.settings.dreambooth.steps=2",
         "attack.settings.custom_diffusion.steps=2", "attack.snapshot_steps=[0, 2]", "attack.n_images=2",
         "attack.seeds=[0]", "evaluate.utility_images=2"]


def _sets(model: Path, evaluators: dict, concepts: list[str]) -> list[str]:
    out = [f"model={model}", f"concepts={concepts}", "evaluate.extractors=[clip, dino]",
           f"evaluate.models.clip={evaluators['clip']}", f"evaluate.models.dino={evaluators['dino']}", *SIZES]
    return [a for s in out for a in ("--set", s)]


def _run(params: Path, sets: list[str], run_root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get(
        "OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, "-m", "mima_lib.experiment.run", str(params), "--run-root", str(run_root),
                           *sets], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)


def _check_report(run_root: Path, experiment: str, attacks: list[str]) -> str:
    report = (run_root / experiment / "report" / "report.md").read_text()
    for a in attacks:
        assert f"## {a}: SGR (%)" in report, report
    assert "### clip" in report and "### dino" in report
    return report


@pytest.mark.parametrize("name", ["sd14_relearn_artists.yaml", "sd14_relearn_imagenette.yaml"])
def test_sd14_relearning_file_runs_end_to_end(sd_shaped, tmp_path, name):
    data = yaml.safe_load((PARAMS / name).read_text())
    concepts = data["concepts"][:2]
    proc = _run(PARAMS / name, _sets(sd_shaped["model"], sd_shaped["evaluators"], concepts), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = data["experiment"].replace("-", "_")
    report = _check_report(tmp_path, exp, data["attack"]["methods"])
    assert "Harmless fine-tuning" in report and "clip_score" in report  # real-model utility
    erased = yaml.safe_load((tmp_path / exp / "erased" / "erase.json").read_text())
    assert erased["erased"] == concepts and "" in erased["preserve"]  # the bare names; "" kept
    ti = yaml.safe_load((tmp_path / exp / "attacks" / "no_defense" / concepts[0].replace(" ", "_")
                         / "textual_inversion" / "seed0" / "losses.json").read_text())
    assert "<new1>" in ti["prompt"].split() and concepts[0].split()[-1] not in ti["prompt"].lower()


def test_sd14_personalization_file_runs_end_to_end_with_its_relative_image_root(sd_shaped, tmp_path):
    """The shipped file names `image_root: customconcept101` relative to itself; the notebooks run in
    notebooks/, so the path must be resolved against the file's folder before they start."""
    from PIL import Image

    from mima_lib.toy import world

    data = yaml.safe_load((PARAMS / "sd14_personalization.yaml").read_text())
    concepts = data["concepts"][:2]
    params = tmp_path / "params" / "sd14_personalization.yaml"
    params.parent.mkdir()
    shutil.copy(PARAMS / "sd14_personalization.yaml", params)
    for c, shape in zip(concepts, ["cat", "dog"]):
        folder = params.parent / data["data"]["image_root"] / c.replace(" ", "_")
        folder.mkdir(parents=True)
        rows = ["file_name,prompt"]
        for i, im in enumerate(world.render_many(shape, 5, 70_000, size=64)):
            im.resize((80, 80), Image.BICUBIC).save(folder / f"{i}.png")  # resized to 64 on loading
            rows.append(f"{i}.png,{data['definitions'][c]['prompt']}")
        (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    sets = _sets(sd_shaped["model"], sd_shaped["evaluators"], concepts)
    proc = _run(params, sets, tmp_path / "runs")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_report(tmp_path / "runs", "sd14_personalization", data["attack"]["methods"])
    cd = tmp_path / "runs" / "sd14_personalization" / "attacks" / "mima" / concepts[0].replace(" ", "_") \
        / "custom_diffusion" / "seed0" / "manifest.json"
    assert '"modifier_token": "<new1>"' in cd.read_text()  # Custom Diffusion learns its modifier token


def test_sd14_files_fail_before_any_notebook_when_an_extractor_cannot_be_built(sd_shaped, tmp_path):
    """LPIPS is one of the files' extractors; where it cannot run, validation says so, and nothing starts."""
    sets = _sets(sd_shaped["model"], sd_shaped["evaluators"], ["van gogh", "claude monet"])
    sets[sets.index("evaluate.extractors=[clip, dino]")] = "evaluate.extractors=[clip, dino, lpips]"
    try:
        import lpips  # noqa: F401

        pytest.skip("LPIPS imports here")
    except Exception:
        pass
    proc = _run(PARAMS / "sd14_relearn_artists.yaml", sets, tmp_path)
    assert proc.returncode == 1 and "evaluate.extractors: 'lpips' cannot be built here" in proc.stderr
    assert not (tmp_path / "sd14_relearn_artists" / "notebooks").exists() or \
        not any((tmp_path / "sd14_relearn_artists" / "notebooks").iterdir())
