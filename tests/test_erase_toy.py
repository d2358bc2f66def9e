"""UCE on the embedded toy model, as the erasure stage runs it: erased concepts drop to near chance, the others
keep their quality."""
import numpy as np

from mima_lib.experiment.config import ExperimentConfig
from mima_lib.experiment.stages.erasure import uce_arguments
from mima_lib.method.erase import erase_concepts
from mima_lib.toy.quality import recognition

TARGETS = ["van gogh", "claude monet", "cat", "umbrella"]
OTHERS = ["dog", "car", "flower", "pablo picasso", "katsushika hokusai", "kilian eng"]
N = 16  # generations per concept (seeds 0..15): one image is 6.25 points


def test_erasing_two_objects_and_two_artists(toy_pipe_factory, toy_oracle):
    pipe = toy_pipe_factory()
    base, _ = recognition(pipe, toy_oracle, OTHERS, n=N)
    uce = uce_arguments(ExperimentConfig(concepts=TARGETS))
    assert uce["token_positions"] == "all" and uce["lam"] == 8.0  # the toy's own erasure (config.TOY_ERASE)
    info = erase_concepts(pipe, **uce)
    assert info["layers_edited"] == 2 * sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("attn2"))
    erased, _ = recognition(pipe, toy_oracle, TARGETS, n=N)
    after, _ = recognition(pipe, toy_oracle, OTHERS, n=N)
    drop = np.mean([base[c] - after[c] for c in OTHERS])
    print(f"erased {erased}; others before {base} after {after}; mean drop {drop:.3f}")
    assert max(erased.values()) <= 0.25, erased  # chance is 1/13 (objects) and 1/10 (artists)
    assert drop <= 0.10, (base, after)  # the bound
