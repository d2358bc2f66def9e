"""Sweep UCE settings on the toy model: how far the erased concepts fall and how much the others lose.

    python scripts/erase_sweep.py                       # the default: reference rows at lam 0.5, 2, 8
    python scripts/erase_sweep.py '[{"lam": 8, "token_positions": "all", "preserve_scale": 1}]'

Each setting is the `erase:` section of a parameter file, so the sweep erases exactly as the erasure stage
does (mima_lib.experiment.stages.erasure.uce_arguments). Targets: 2 artists + 2 objects (as
tests/test_erase_toy.py); every other base concept is preserved. Prints one JSON line per setting: oracle
accuracy of the targets after erasure, of 6 other concepts before and after, their mean and worst drop
(16 generations per concept, seeds 0-15, 25 DDIM steps, guidance 5).
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from mima_lib.experiment.config import EraseConfig, ExperimentConfig  # noqa: E402
from mima_lib.experiment.stages.erasure import uce_arguments  # noqa: E402
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
    for s in settings:
        pipe = load_toy_pipeline()
        erase_concepts(pipe, **uce_arguments(ExperimentConfig(concepts=TARGETS, erase=EraseConfig(**s))))
        erased, _ = recognition(pipe, oracle, TARGETS, n=n)
        after, _ = recognition(pipe, oracle, OTHERS, n=n)
        drops = [base[c] - after[c] for c in OTHERS]
        print(json.dumps({"settings": s, "erased": erased, "after": after, "mean_drop": round(float(np.mean(drops)), 4),
                          "worst_drop": round(float(max(drops)), 4)}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SWEEP)
