"""UCE on the embedded toy model: erased concepts drop to near chance, the others keep their quality."""
import numpy as np

from mima_lib.toy import world as toyworld
from mima_lib.method.erase import TOY_LAM, erase_concepts
from mima_lib.toy.quality import recognition

TARGETS = ["van gogh", "claude monet", "cat", "umbrella"]
OTHERS = ["dog", "car", "flower", "pablo picasso", "katsushika hokusai", "kilian eng"]
N = 16  # generations per concept (seeds 0..15): one image is 6.25 points


def test_erasing_two_objects_and_two_artists(toy_pipe_factory, toy_oracle):
    pipe = toy_pipe_factory()
    base, _ = recognition(pipe, toy_oracle, OTHERS, n=N)
    preserve = [toyworld.concept(c).prompt for c in toyworld.BASE_OBJECTS + toyworld.BASE_ARTISTS if c not in TARGETS]
    info = erase_concepts(pipe, [toyworld.concept(c).prompt for c in TARGETS], "", preserve, lam=TOY_LAM,
                          token_positions="all")
    assert info["layers_edited"] == 2 * sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("attn2"))
    erased, _ = recognition(pipe, toy_oracle, TARGETS, n=N)
    assert max(erased.values()) <= 0.25, erased  # chance is 1/13 (objects) and 1/10 (artists); measured <= 0.19
    after, _ = recognition(pipe, toy_oracle, OTHERS, n=N)
    drop = np.mean([base[c] - after[c] for c in OTHERS])
    print(f"erased {erased}; others before {base} after {after}; mean drop {drop:.3f}")
    assert drop <= 0.10, (base, after)  # the bound; measured 4.2 points (lam 0.5 gave 10.4)
