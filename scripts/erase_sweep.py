"""Sweep UCE settings on the toy model: how far the erased concepts fall and how much the others lose.

    python scripts/erase_sweep.py                       # lam 0.5, 2, 8 (how erase.TOY_LAM was chosen)
    python scripts/erase_sweep.py '[{"lam": 8, "preserve_scale": 3}]'

Targets: 2 artists + 2 objects (as tests/test_erase_toy.py); every other base concept is preserved. Prints
one JSON line per setting: oracle accuracy of the targets after erasure, of 6 other concepts before and
after, and their mean drop (16 generations per concept, seeds 0-15, 25 DDIM steps, guidance 5).
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from mima_lib.toy import world as toyworld  # noqa: E402
from mima_lib.method.erase import erase_concepts  # noqa: E402
from mima_lib.toy.model import load_toy_pipeline  # noqa: E402
from mima_lib.toy.oracle import load_toy_oracle  # noqa: E402
from mima_lib.toy.quality import recognition  # noqa: E402

TARGETS = ["van gogh", "claude monet", "cat", "umbrella"]
OTHERS = ["dog", "car", "flower", "pablo picasso", "katsushika hokusai", "kilian eng"]
DEFAULT_SWEEP = [{"lam": 0.5}, {"lam": 2.0}, {"lam": 8.0}]


def main(settings: list[dict], n: int = 16) -> None:
    oracle = load_toy_oracle()
    base, _ = recognition(load_toy_pipeline(), oracle, OTHERS, n=n)
    print(json.dumps({"base": base}), flush=True)
    preserve = [toyworld.concept(c).prompt for c in toyworld.BASE_OBJECTS + toyworld.BASE_ARTISTS
                if c not in TARGETS]
    for s in settings:
        pipe = load_toy_pipeline()
        erase_concepts(pipe, [toyworld.concept(c).prompt for c in TARGETS], "", preserve,
                       **{"token_positions": "all", **s})
        erased, _ = recognition(pipe, oracle, TARGETS, n=n)
        after, _ = recognition(pipe, oracle, OTHERS, n=n)
        drop = float(np.mean([base[c] - after[c] for c in OTHERS]))
        print(json.dumps({"settings": s, "erased": erased, "after": after, "mean_drop": round(drop, 4)}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SWEEP)
