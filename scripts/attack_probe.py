"""Run one attack on one concept of an erased toy model and print the oracle's accuracy (issue #14's bar 3).

    python scripts/toy_bars.py --only relearn --attacks dreambooth   # writes runs/toy_bars/toy_bars_relearn
    python scripts/attack_probe.py runs/toy_bars/toy_bars_relearn "van gogh" dreambooth \\
        --set prior_preservation=false --guidance 1 2 5 7.5         # does guidance cancel the style?
    python scripts/attack_probe.py RUN "van gogh" textual_inversion --set lr=0.2 --set schedule=cosine

RUN is a run folder whose erased/erased.safetensors holds the UCE-erased UNet (toy_bars' relearn part writes
one). The attack starts from the toy defaults with the --set overrides (VALUE is JSON; bare words are strings)
and trains on the toy attacker's 20 renders. Printed: accuracy at each snapshot step (16 generations, seeds
0-15, guidance 5, as toy_bars), then the final model's accuracy at each --guidance.
"""
import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mima_lib.attacks import make_settings, run_attack  # noqa: E402
from mima_lib.method.diffusion import generate  # noqa: E402
from mima_lib.method.paramsets import apply_unet_params  # noqa: E402
from mima_lib.method.tensor_io import load_tensors  # noqa: E402
from mima_lib.toy import data as toy_data  # noqa: E402
from mima_lib.toy import world  # noqa: E402
from mima_lib.toy.model import load_toy_pipeline  # noqa: E402
from mima_lib.toy.oracle import load_toy_oracle  # noqa: E402

N, SAMPLE_STEPS, GUIDANCE = 16, 25, 5.0  # as scripts/toy_bars.py (default.yaml's data settings)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("concept")
    ap.add_argument("attack", choices=["lora", "dreambooth", "textual_inversion", "custom_diffusion"])
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE override of the attack's toy settings")
    ap.add_argument("--guidance", type=float, nargs="*", default=[], help="also sample the final model at these")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    weights = os.path.join(args.run_dir, "erased", "erased.safetensors")
    if not os.path.exists(weights):
        raise SystemExit(f"{weights} not found: give a run folder with an erased model (scripts/toy_bars.py "
                         "--only relearn writes one)")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write KEY=VALUE")
        overrides[key] = _value(value)
    settings = make_settings(args.attack, overrides, "toy")  # unknown keys fail here, before any work
    c = world.concept(args.concept)
    prompt = c.textual_inversion_prompt(settings.token) if args.attack == "textual_inversion" else c.prompt
    images, _ = toy_data.toy_attack_data(c.name)
    pipe = load_toy_pipeline()
    apply_unet_params(pipe.unet, load_tensors(weights))
    res = run_attack(args.attack, pipe, images, prompt, settings, defaults="toy", snapshot_prompts=[prompt] * N,
                     snapshot_seeds=list(range(N)), sample_steps=SAMPLE_STEPS, guidance=GUIDANCE)
    oracle = load_toy_oracle()
    by_step = {s: oracle.accuracy(x, c.name) for s, x in sorted(res.snapshots.items())}
    print(f"{c.name}, {args.attack} {overrides}: accuracy by step (guidance {GUIDANCE}) {by_step}; "
          f"best {max(by_step.values()):.2f}")
    for g in args.guidance:
        x = generate(res.pipe, [prompt] * N, list(range(N)), SAMPLE_STEPS, g)
        print(f"  final model at guidance {g}: {oracle.accuracy(x, c.name):.2f}")


if __name__ == "__main__":
    main()
