"""UCE on the embedded toy model, as the erasure stage runs it (the reference code's bare names, lam 0.5, and
the targets' prompts):
each erased concept drops to near chance, every other concept keeps its quality (issue #14's bars, per
concept). The targets are not the default experiment's, so the bound is not tuned to one parameter file."""
import pytest

from mima_lib.experiment.config import ConfigError, EraseConfig, ExperimentConfig, erase_settings_used
from mima_lib.experiment.stages.erasure import uce_arguments
from mima_lib.method.erase import erase_concepts
from mima_lib.toy import world as toyworld
from mima_lib.toy.quality import recognition

TARGETS = ["dog", "apple", "plane", "pablo picasso", "tyler edlin", "kirbi fagan"]
OTHERS = ["cat", "car", "flower", "cup", "van gogh", "katsushika hokusai", "kilian eng"]
N = 16  # generations per concept (seeds 0..15): one image is 6.25 points
ARTISTS_ONLY = ["claude monet", "kilian eng"]  # monet's name moved "a photo of a" most
OBJECTS_KEPT = ["cup", "flower", "cat", "house"]


def test_erasing_three_objects_and_three_artists(toy_pipe_factory, toy_oracle):
    pipe = toy_pipe_factory()
    base, _ = recognition(pipe, toy_oracle, OTHERS, n=N)
    uce = uce_arguments(ExperimentConfig(concepts=TARGETS))
    assert uce["token_positions"] == "reference" and uce["lam"] == 0.5  # the reference code's UCE
    prompts = [toyworld.concept(c).prompt for c in TARGETS]
    assert uce["erase_prompts"] == TARGETS + prompts and "" in uce["preserve_prompts"]  # names, then prompts
    info = erase_concepts(pipe, **uce)
    assert info["layers_edited"] == 2 * sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("attn2"))
    erased, _ = recognition(pipe, toy_oracle, TARGETS, n=N)
    after, _ = recognition(pipe, toy_oracle, OTHERS, n=N)
    print(f"erased {erased}; others before {base} after {after}")
    assert max(erased.values()) <= 0.20, erased  # the bar; chance is 1/13 (objects), 1/10 (artists)
    worst = max(abs(base[c] - after[c]) for c in OTHERS)
    assert worst <= 0.10 + 1e-9, (base, after)  # within 10 points per concept, not only on average


def test_erasing_artists_alone_keeps_the_objects(toy_pipe_factory, toy_oracle):
    """With no object among the targets nothing pinned "a photo of a": erasing van gogh + monet alone left cup,
    flower, cat, tree, fish and plane at 0% (blank squares, blobs; base 100%), monet alone cup and flower at 0%.
    The template of the kind with no target is now preserved: those six objects 100% on 8 artist-only sets."""
    pipe = toy_pipe_factory()
    base, _ = recognition(pipe, toy_oracle, OBJECTS_KEPT, n=8)
    uce = uce_arguments(ExperimentConfig(concepts=ARTISTS_ONLY))
    assert uce["preserve_prompts"][-1] == toyworld.TEMPLATE_PROMPTS["object"]
    erase_concepts(pipe, **uce)
    erased, _ = recognition(pipe, toy_oracle, ARTISTS_ONLY, n=8)
    after, _ = recognition(pipe, toy_oracle, OBJECTS_KEPT, n=8)
    print(f"erased {erased}; objects before {base} after {after}")
    assert max(erased.values()) <= 0.25, erased  # two of eight at most
    assert max(abs(base[c] - after[c]) for c in OBJECTS_KEPT) <= 0.125 + 1e-9, (base, after)  # one of eight


def test_the_toy_also_erases_the_templated_prompts():
    """On the toy, UCE's reference rows (the bare names) come with each target's prompt (erase.templated);
    erase.templated: false gives the reference code's rows alone. Preserved: "" and every other base concept."""
    uce = uce_arguments(ExperimentConfig(concepts=["cat", "van gogh"]))
    assert uce["erase_prompts"] == ["cat", "van gogh", "a photo of a cat", "an artwork of van gogh"]
    assert uce["guide_prompts"] == [""] * 4
    assert uce["preserve_prompts"] == [""] + [c for c in toyworld.BASE_OBJECTS + toyworld.BASE_ARTISTS
                                              if c not in ("cat", "van gogh")]
    assert not set(toyworld.TEMPLATE_PROMPTS.values()) & set(uce["preserve_prompts"])  # both kinds are targets
    for targets, untargeted in ((["cat", "car"], "artist"), (["van gogh"], "object")):
        one_kind = uce_arguments(ExperimentConfig(concepts=targets))  # the other kind's template is preserved
        assert one_kind["preserve_prompts"][-1] == toyworld.TEMPLATE_PROMPTS[untargeted]
    off = uce_arguments(ExperimentConfig(concepts=["van gogh"], erase=EraseConfig(keep_templates=False)))
    assert not set(toyworld.TEMPLATE_PROMPTS.values()) & set(off["preserve_prompts"])
    with pytest.raises(ConfigError, match="keep_templates.*erase.preserve"):  # the toy's templates only
        erase_settings_used(ExperimentConfig(model="runs/my-sd", concepts=["x"],
                                             erase=EraseConfig(keep_templates=True)))
    mine = uce_arguments(ExperimentConfig(concepts=["van gogh"], erase=EraseConfig(preserve=["cup"])))
    assert mine["preserve_prompts"] == ["", "cup"]  # a preserve list of one's own is taken as written
    plain = uce_arguments(ExperimentConfig(concepts=["cat", "van gogh"], erase=EraseConfig(templated=False)))
    assert plain["erase_prompts"] == ["cat", "van gogh"] and plain["guide_prompts"] == ["", ""]
