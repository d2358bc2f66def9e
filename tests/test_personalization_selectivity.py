"""Selectivity in the personalization task on the toy: MIMA on two instances ("a photo of <new1> cat", "...
dog") must leave untargeted concepts drawn, through the experiment's own stages. The instances' own rows start
at `< new 1 >`, tokens the toy text encoder never saw; with the prior's rows alone the selective span
overlapped other concepts' names and MIMA left flower, tree, cup and van gogh blank (0%), every seed. The toy's
personalization defaults (experiment/config._toy_personalization_contrast) narrow the span against every other
base concept's rows."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import yaml  # noqa: E402

from mima_lib.experiment.config import immunize_config  # noqa: E402
from mima_lib.experiment.loading import load_experiment  # noqa: E402
from mima_lib.toy import world  # noqa: E402
from mima_lib.toy.model import TOY_MODEL  # noqa: E402

TARGETS = ["purple cat", "spotted dog"]
OTHERS = ["flower", "cup", "tree", "van gogh"]  # all four were 0% after MIMA before the contrast
N = 8
STEP = 40

PARAMS = {
    "experiment": "personalization-selectivity-test", "model": "toy", "seed": 0, "task": "personalization",
    "concepts": TARGETS, "utility_concepts": OTHERS, "erase": {"enabled": False},
    "data": {"source": "render", "immunization_images": 20, "attack_images": 20, "reference_images": 4,
             "regularization_images": 48, "regularization_concepts": ["car", "house", "pablo picasso"]},
    "immunize": {"methods": ["mima"]},  # the toy defaults
    "attack": {"methods": ["lora"], "settings": {"lora": {"steps": STEP}}, "snapshot_steps": [0, STEP],
               "n_images": N},
    "evaluate": {"extractors": ["oracle"], "utility_images": N},
}


def test_the_toy_personalization_defaults_narrow_against_every_other_concept(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(PARAMS))
    icfg = immunize_config(load_experiment(path), "mima")
    assert icfg.row_contrast == 1.0 and icfg.protect_prompts == ["a photo of a cat", "a photo of a dog"]
    others = [world.concept(c).prompt for c in world.BASE_OBJECTS + world.BASE_ARTISTS if c not in ("cat", "dog")]
    assert icfg.contrast_prompts == others  # the classes are protected instead
    mine = immunize_config(load_experiment(
        path, ["immunize.settings={row_contrast: 0.5, contrast_prompts: [a photo of a cup]}"]), "mima")
    assert (mine.row_contrast, mine.contrast_prompts) == (0.5, ["a photo of a cup"])  # a file's own values are kept
    relearn = load_experiment(path, ["task=relearning", "concepts=[cat, van gogh]", "erase.enabled=true"])
    assert immunize_config(relearn, "mima").contrast_prompts == []  # the re-learning defaults are unchanged


@pytest.mark.skipif(not (TOY_MODEL / "model_index.json").exists(), reason="the trained toy model is not built yet")
def test_mima_on_two_instances_spares_the_other_concepts(mima_then_lora):
    """Measured (seed 0, 2026-12-06, scripts not committed; README, "The seed grid"): before the contrast,
    flower / tree / cup / van gogh 0% after MIMA; with it, all ten measured concepts 100% and LoRA at step 40
    6 / 0% on the instances (no defense 44 / 88%, 16 generations). Bounds: each untargeted concept within 25
    points of the unimmunized model (n = 8: one image is 12.5 points); the instances' mean <= 30% at step 40."""
    _, _, acc, util = mima_then_lora(PARAMS, STEP)
    for c in OTHERS:
        assert abs(util[c]["mima"] - util[c]["no defense"]) <= 0.25, (c, util[c])
    assert sum(acc["mima"].values()) / len(TARGETS) <= 0.3, acc
