"""Sweep UCE settings on the toy model: how far the erased concepts fall and how much the others lose.

    python scripts/erase_sweep.py                       # the default: UCE's reference scheme at lam 0.5, 2, 8
    python scripts/erase_sweep.py '[{"lam": 8, "token_positions": "all", "preserve_scale": 1}]'
    python scripts/erase_sweep.py '[{"lam": 0.5}]' --targets dog fish "tyler edlin"

Each setting is the `erase:` section of a parameter file, so the sweep erases exactly as the erasure stage
does (mima_lib.experiment.stages.erasure.uce_arguments). Targets: 3 objects + 3 artists by default; every
other base concept is preserved and measured. Prints one JSON line per setting: oracle accuracy of the
targets after erasure, of every other concept before and after, their mean and worst drop (16 generations per
concept, seeds 0-15, 25 DDIM steps, guidance 5).
"""
import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from mima_lib.experiment.config import EraseConfig, ExperimentConfig  # noqa: E402
from mima_lib.experiment.stages.erasure import uce_arguments  # noqa: E402
from mima_lib.method.erase import erase_concepts  # noqa: E402
from mima_lib.toy.model import load_toy_pipeline  # noqa: E402
from mima_lib.toy.oracle import load_toy_oracle  # noqa: E402
from mima_lib.toy.quality import recognition  # noqa: E402

from mima_lib.toy.world import BASE_ARTISTS, BASE_OBJECTS  # noqa: E402

TARGETS = ["cat", "umbrella", "car", "van gogh", "claude monet", "kelly mckernan"]
DEFAULT_SWEEP = [{"lam": 0.5}, {"lam": 2.0}, {"lam": 8.0}]


def main(settings: list[dict], targets: list[str] = TARGETS, n: int = 16) -> None:
    oracle = load_toy_oracle()
    others = [c for c in BASE_OBJECTS + BASE_ARTISTS if c not in targets]
    base, _ = recognition(load_toy_pipeline(), oracle, targets + others, n=n)
    print(json.dumps({"base": base}), flush=True)
    for s in settings:
        pipe = load_toy_pipeline()
        erase_concepts(pipe, **uce_arguments(ExperimentConfig(concepts=targets, erase=EraseConfig(**s))))
        erased, _ = recognition(pipe, oracle, targets, n=n)
        after, _ = recognition(pipe, oracle, others, n=n)
        drops = [base[c] - after[c] for c in others]
        print(json.dumps({"settings": s, "erased": erased, "after": after, "mean_drop": round(float(np.mean(drops)), 4),
                          "worst_drop": round(float(max(drops)), 4)}), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="?", default=json.dumps(DEFAULT_SWEEP), help="a JSON list of erase sections")
    ap.add_argument("--targets", nargs="+", default=TARGETS)
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args()
    main(json.loads(args.settings), args.targets, args.n)
