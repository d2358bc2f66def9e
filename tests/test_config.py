"""Parameter files are validated before anything runs; each error names the key and the fix."""
from pathlib import Path

import pytest
import yaml

from mima_lib.experiment.dataclass_yaml import ConfigError, from_dict, load_yaml
from mima_lib.experiment.config import ExperimentConfig
from mima_lib.experiment.loading import load_experiment
from mima_lib.experiment.run import main as run_main

PARAMS = Path(__file__).resolve().parent.parent / "papermill_params"


def _write(tmp_path, data, name="p.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in PARAMS.glob("*.yaml")))
def test_every_shipped_parameter_file_parses(name):
    cfg = from_dict(ExperimentConfig, load_yaml(PARAMS / name))  # device/folder checks need the GPU machine
    assert cfg.concepts
    if cfg.is_toy:
        load_experiment(PARAMS / name)  # the embedded defaults pass every check here


@pytest.mark.parametrize("data, match", [
    ({"concepts": ["cat"], "epochs": 3}, "unknown key 'epochs'"),
    ({"concepts": ["cat"], "immunize": {"metods": ["mima"]}}, "unknown key 'immunize.metods'; did you mean 'methods'"),
    ({"concepts": ["cat"], "grid": {"benign_steps": 100}}, "'grid.benign_steps' has moved to 'evaluate.benign_steps'"),
    ({"concepts": "cat"}, "concepts: expected a list"),
    ({"concepts": ["cat"], "seed": "zero"}, "seed: expected int"),
    ({"concepts": ["cat"], "seed": True}, "seed: expected int"),
    ({"concepts": ["cat"], "data": {"attack_images": 0}}, "data.attack_images: 0 is below the minimum 1"),
    ({"concepts": ["cat"], "task": "relearn"}, "task: 'relearn' is not one of .*did you mean 'relearning'"),
    ({"concepts": ["cat"], "attack": {"methods": ["lora", "dreambath"]}}, "'dreambath' is not one of"),
    ({"concepts": ["zebra"]}, "unknown toy-world concept 'zebra'.*definitions:"),
    ({"concepts": []}, "concepts: the list is empty"),
    ({"concepts": ["cat", "cat"]}, "duplicate"),
    ({"concepts": ["cat"], "data": {"image_root": "/nowhere/at/all"}}, "image_root: folder /nowhere/at/all does not exist"),
    ({"concepts": ["cat"], "model": "/nowhere/model"}, "model: path /nowhere/model does not exist"),
    ({"concepts": ["cat"], "device": "cuda"}, "no CUDA GPU"),
    ({"concepts": ["cat"], "data": {"regularization_concepts": ["cat"]}}, "regularization_concepts: \\['cat'\\] are also targets"),
    ({"concepts": ["cat"], "data": {"regularization_concepts": ["zebra"]}}, "unknown toy-world concept 'zebra'"),
    ({"concepts": ["cat"], "data": {"source": "photos"}}, "data.source: 'photos' is not one of"),
    ({"concepts": ["cat"], "model": "CompVis/stable-diffusion-v1-4", "data": {"source": "render"}},
     "data.source: 'render' exists only for the toy world"),
])
def test_bad_settings_fail_clearly(tmp_path, data, match):
    import torch

    if data.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=match):
        load_experiment(_write(tmp_path, data))


def test_missing_concept_folder_is_named(tmp_path):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no image folder .*van_gogh for concept 'van gogh'"):
        load_experiment(_write(tmp_path, {"concepts": ["cat", "van gogh"], "data": {"image_root": str(tmp_path / "imgs")}}))


@pytest.mark.parametrize("text, match", [
    ("concepts: [cat\n", "not valid YAML"),
    ("- just\n- a list\n", "must be a mapping"),
    ("concepts: [cat]\n\tseed: 1\n", "not valid YAML"),
])
def test_malformed_yaml(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_experiment(_write(tmp_path, text))


def test_runner_refuses_bad_file_before_any_notebook(tmp_path, capsys):
    bad = _write(tmp_path, {"experiment": "bad", "concepts": ["cat"], "attack": {"steps": 3}})
    assert run_main([str(bad), "--run-root", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'attack.steps'" in err and str(bad) in err
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_immunize_settings_are_checked_before_running(tmp_path):
    with pytest.raises(ConfigError, match="unknown keys \\['inner_param'\\]"):
        load_experiment(_write(tmp_path, {"concepts": ["cat"], "immunize": {"settings": {"inner_param": "unet"}}}))
    with pytest.raises(ConfigError, match="outer"):
        load_experiment(_write(tmp_path, {"concepts": ["cat"], "immunize": {"settings": {"outer_params": "all"}}}))


@pytest.mark.parametrize("data, match", [
    ({"concepts": ["cat"], "attack": {"methods": ["lora"], "settings": {"lora": {"rnak": 4}}}}, "attack.settings.lora: .*rnak"),
    ({"concepts": ["cat"], "attack": {"methods": ["lora"], "settings": {"dreambooth": {}}}}, "not in attack.methods"),
    ({"concepts": ["cat"], "immunize": {"settings": {"order": 3}}}, "order"),
    ({"concepts": ["cat"], "immunize": {"methods": ["mima"], "per_method": {"imma-joint": {}}}}, "not in immunize.methods"),
])
def test_method_settings_are_checked_before_running(tmp_path, data, match):
    with pytest.raises(ConfigError, match=match):
        load_experiment(_write(tmp_path, data))


def test_render_source_and_regularization_concepts_shape_the_data(tmp_path):
    """data.source 'render': the toy renderer supplies immunization/attack images (attack = the attacker's
    renders, seeds 20_000+); regularization_concepts add their own prompts to the prior's."""
    from mima_lib.experiment.stages import data as stage_data
    from mima_lib.toy import data as toy_data
    from mima_lib.toy import world as toyworld

    cfg = load_experiment(_write(tmp_path, {"concepts": ["cat"], "data": {
        "source": "render", "attack_images": 3, "immunization_images": 2, "reference_images": 2,
        "regularization_concepts": ["dog", "van gogh"]}}))
    parts = stage_data._concept_images(cfg, None, "cat", 0)  # no model needed: nothing is generated
    assert [len(parts[k]) for k in ("immunize", "attack", "reference")] == [2, 3, 2]
    expected, _ = toy_data.toy_attack_data("cat")
    assert [im.tobytes() for im in parts["attack"]] == [im.tobytes() for im in expected[:3]]
    assert parts["immunize"][0].tobytes() != parts["attack"][0].tobytes()
    assert stage_data.regularization_prompts(cfg) == [toyworld.GENERIC_OBJECT_PROMPT, "a photo of a dog",
                                                  toyworld.concept("van gogh").prompt]
