"""UCE on the embedded toy model, as the erasure stage runs it (the reference code's bare names, lam 0.5, and
the targets' prompts):
each erased concept drops to near chance, every other concept keeps its quality (issue #14's bars, per
concept). The targets are not the default experiment's, so the bound is not tuned to one parameter file."""
from mima_lib.experiment.config import EraseConfig, ExperimentConfig
from mima_lib.experiment.stages.erasure import uce_arguments
from mima_lib.method.erase import erase_concepts
from mima_lib.toy import world as toyworld
from mima_lib.toy.quality import recognition

TARGETS = ["dog", "apple", "plane", "pablo picasso", "tyler edlin", "kirbi fagan"]
OTHERS = ["cat", "car", "flower", "cup", "van gogh", "katsushika hokusai", "kilian eng"]
N = 16  # generations per concept (seeds 0..15): one image is 6.25 points


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


def test_the_toy_also_erases_the_templated_prompts():
    """On the toy, UCE's reference rows (the bare names) come with each target's prompt (erase.templated);
    erase.templated: false gives the reference code's rows alone. Preserved: "" and every other base concept."""
    uce = uce_arguments(ExperimentConfig(concepts=["cat", "van gogh"]))
    assert uce["erase_prompts"] == ["cat", "van gogh", "a photo of a cat", "an artwork of van gogh"]
    assert uce["guide_prompts"] == [""] * 4
    assert uce["preserve_prompts"] == [""] + [c for c in toyworld.BASE_OBJECTS + toyworld.BASE_ARTISTS
                                              if c not in ("cat", "van gogh")]
    plain = uce_arguments(ExperimentConfig(concepts=["cat", "van gogh"], erase=EraseConfig(templated=False)))
    assert plain["erase_prompts"] == ["cat", "van gogh"] and plain["guide_prompts"] == ["", ""]
