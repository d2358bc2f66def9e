"""Which rows UCE erases on the toy, and what that costs (issue #14's erasure bar on the v4 model).

    python scripts/erase_rows.py                                   # the default rows, issue #14's six targets
    python scripts/erase_rows.py --rows bare                       # the reference code's: bare names only
    python scripts/erase_rows.py --rows bare+templates             # bare names, the two templates preserved
    python scripts/erase_rows.py --targets dog fish apple "tyler edlin" "kilian eng" "pablo picasso"
    python scripts/erase_rows.py --targets "van gogh" "claude monet" --rows templated   # no template kept

Erases the targets from the committed toy model as the erasure stage does (mima_lib.experiment.stages.erasure:
'default' = erase.templated and erase.keep_templates, the toy's defaults; 'templated' = without the kept
templates), then prints one JSON line: each target's oracle accuracy, every
other base concept whose accuracy changed (16 generations each, before and after), and how far the template
words' K/V outputs moved (||dW r|| / ||W0 r||, the mean over the cross-attention K/V layers).
"""
import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mima_lib.experiment.config import EraseConfig, ExperimentConfig  # noqa: E402
from mima_lib.experiment.stages.erasure import uce_arguments  # noqa: E402
from mima_lib.method.erase import erase_concepts  # noqa: E402
from mima_lib.method.selective import relative_change  # noqa: E402
from mima_lib.method.text_tokens import encode_prompt_tokens  # noqa: E402
from mima_lib.toy import world  # noqa: E402
from mima_lib.toy.model import load_toy_pipeline  # noqa: E402
from mima_lib.toy.oracle import load_toy_oracle  # noqa: E402
from mima_lib.toy.quality import recognition  # noqa: E402

TARGETS = ["cat", "umbrella", "car", "van gogh", "claude monet", "kelly mckernan"]


def template_row_change(pipe, before: dict) -> dict:
    out = {}
    with torch.no_grad():
        for prompt in world.TEMPLATE_PROMPTS.values():
            rows = encode_prompt_tokens(pipe, prompt)[0]
            for i, word in enumerate(prompt.split(), start=1):
                ch = [relative_change(pipe.unet.get_submodule(n).weight, W, rows[i:i + 1]) for n, W in before.items()]
                out[f"{prompt}[{i}] {word}"] = round(sum(ch) / len(ch), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=TARGETS)
    ap.add_argument("--rows", choices=["default", "templated", "bare", "bare+templates"], default="default")
    ap.add_argument("--n", type=int, default=16, help="generations per concept")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    unknown = [c for c in args.targets if not world.knows(c)]
    if unknown:
        raise SystemExit(f"unknown toy concepts {unknown}; choose among {world.BASE_OBJECTS + world.BASE_ARTISTS}")
    t0 = time.time()
    oracle, pipe = load_toy_oracle(), load_toy_pipeline()
    others = [c for c in world.BASE_OBJECTS + world.BASE_ARTISTS if c not in args.targets]
    base, _ = recognition(pipe, oracle, others, n=args.n)
    uce = uce_arguments(ExperimentConfig(concepts=args.targets,
                                         erase=EraseConfig(templated=args.rows in ("default", "templated"),
                                                           keep_templates=args.rows == "default")))
    if args.rows == "bare+templates":
        uce["preserve_prompts"] = uce["preserve_prompts"] + list(world.TEMPLATE_PROMPTS.values())
    before = {n: m.weight.detach().clone() for n, m in pipe.unet.named_modules()
              if n.endswith(("attn2.to_k", "attn2.to_v"))}
    erase_concepts(pipe, **uce)
    targets, _ = recognition(pipe, oracle, args.targets, n=args.n)
    after, _ = recognition(pipe, oracle, others, n=args.n)
    print(json.dumps({"rows": args.rows, "targets": {c: round(a, 3) for c, a in targets.items()},
                      "others_changed_points": {c: round(100 * (after[c] - base[c])) for c in others
                                                if after[c] != base[c]},
                      "template_row_kv_change": template_row_change(pipe, before),
                      "seconds": round(time.time() - t0)}))


if __name__ == "__main__":
    main()
