"""One record per concept, built once from the parameter file: kinds are declared, never guessed; every
prompt a stage uses comes from the record; bad definitions fail before anything runs."""
from pathlib import Path

import pytest
import yaml

from mima_lib.experiment.concepts import placeholder_prompt
from mima_lib.experiment.loading import load_experiment
from mima_lib.experiment.dataclass_yaml import ConfigError

PARAMS = Path(__file__).resolve().parent.parent / "papermill_params"


def _load(tmp_path, data):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_experiment(path)


def test_toy_concepts_take_their_prompts_from_the_toy_world(tmp_path):
    cfg = _load(tmp_path, {"concepts": ["cat", "van gogh"]})
    cat, vg = cfg.concept("cat"), cfg.concept("van gogh")
    assert (cat.kind, cat.prompt, cat.attack_prompt, cat.ti_prompt) == \
        ("object", "a photo of a cat", "a photo of a cat", "a photo of a <new1>")
    assert (vg.kind, vg.ti_prompt, vg.generic_prompt, vg.guide) == ("artist", "an artwork of <new1>", "artwork", "")
    pers = _load(tmp_path, {"concepts": ["purple cat"], "task": "personalization", "erase": {"enabled": False}})
    assert pers.concept("purple cat").attack_prompt == "a photo of <new1> cat"
    assert (pers.concept("purple cat").class_prompt, cat.class_prompt) == ("a photo of a cat", None)
    # the selective update leaves the instances' classes alone (ImmunizeConfig.protect_prompts)
    from mima_lib.experiment.config import immunize_config
    assert immunize_config(pers, "mima").protect_prompts == ["a photo of a cat"]
    assert immunize_config(cfg, "mima").protect_prompts == []


def test_a_declared_kind_is_not_guessed_from_the_words(tmp_path):
    """'dart board' has 'art' in its prompt: the old guess made it an artist."""
    cfg = _load(tmp_path, {"concepts": ["dart board"], "model": "toy",
                           "definitions": {"dart board": {"kind": "object", "prompt": "a photo of a dart board"}},
                           "erase": {"guide": None}})
    c = cfg.concept("dart board")
    assert (c.kind, c.generic_prompt, c.guide, c.toy) == ("object", "a photo of an object", "a photo of an object",
                                                          False)


@pytest.mark.parametrize("prompt, name, expected", [
    ("an artwork of Van Gogh", "van gogh", "an artwork of <new1>"),
    ("an artwork of Kelly  McKernan", "kelly mckernan", "an artwork of <new1>"),
    ("a photo of French horn", "french horn", "a photo of <new1>"),
    ("a photo of a golf ball on grass", "golf ball", "a photo of a <new1> on grass"),
    ("an artwork of Monet", "claude monet", None),
    ("a photo of a cathedral", "cat", None),  # whole words only
])
def test_textual_inversion_placeholder_replaces_the_name_in_any_case(prompt, name, expected):
    assert placeholder_prompt(prompt, name) == expected


@pytest.mark.parametrize("definition, match", [
    ({"prompt": "an artwork of X"}, "definitions.x.kind: missing"),
    ({"kind": "painter", "prompt": "an artwork of X"}, "'painter' is not one of"),
    ({"kind": "artist"}, "definitions.x.prompt: missing"),
    ({"kind": "instance", "prompt": "a photo of my cat"}, "has no '<new1>'"),
    ({"kind": "artist", "prompt": "an artwork of X", "ti_prompt": "an artwork of it"}, "must contain the placeholder"),
    ({"kind": "artist", "prompt": "an artwork of X", "colour": "red"}, "unknown key 'definitions.x.colour'"),
])
def test_bad_definitions_fail_clearly(tmp_path, definition, match):
    with pytest.raises(ConfigError, match=match):
        _load(tmp_path, {"concepts": ["x"], "definitions": {"x": definition}})


def test_textual_inversion_needs_a_place_for_its_placeholder(tmp_path):
    data = {"concepts": ["monet"], "definitions": {"monet": {"kind": "artist", "prompt": "an artwork of Claude M."}},
            "attack": {"methods": ["textual_inversion"]}}
    with pytest.raises(ConfigError, match="no place for Textual Inversion's placeholder.*ti_prompt"):
        _load(tmp_path, data)
    data["definitions"]["monet"]["ti_prompt"] = "an artwork of <new1>"
    assert _load(tmp_path, data).concept("monet").ti_prompt == "an artwork of <new1>"


@pytest.mark.parametrize("name", sorted(p.name for p in PARAMS.glob("sd14_*.yaml")))
def test_every_sd14_concept_declares_its_kind_and_places_its_placeholder(tmp_path, name):
    data = yaml.safe_load((PARAMS / name).read_text())
    data.update(model="toy", device="cpu")  # the records do not depend on the model; validation here needs one
    data["evaluate"] = {"extractors": ["oracle"]}  # CLIP / DINO weights are not here (no hub)
    data["data"].pop("image_root", None)
    if data["task"] == "personalization":
        data["data"]["image_root"] = str(tmp_path)
        for c in data["concepts"]:
            (tmp_path / c.replace(" ", "_")).mkdir()
    cfg = _load(tmp_path, data)
    for c in cfg.concepts:
        rec = cfg.concept(c)
        assert not rec.toy and rec.kind == {"sd14_relearn_artists.yaml": "artist",
                                            "sd14_relearn_imagenette.yaml": "object",
                                            "sd14_personalization.yaml": "instance"}[name]
        assert "<new1>" in rec.ti_prompt.split(), rec
        if rec.kind == "instance":  # the class: the prompt without the modifier token
            assert rec.class_prompt == rec.attack_prompt.replace("<new1> ", ""), rec
