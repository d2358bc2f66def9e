"""Probe what immunization costs the untargeted concepts of a parameter file (issue #14's utility diagnosis).

    python scripts/utility_probe.py                                # default.yaml, the toy defaults
    python scripts/utility_probe.py --steps 30                     # fewer upper steps
    python scripts/utility_probe.py --noise                        # also: how the oracle reads pure noise
    python scripts/utility_probe.py --set "concepts=[cat, umbrella, van gogh, claude monet]"   # other targets

Prints, for each utility concept of the file:
- row share: the part of its text-state rows' norm inside the span MIMA's selective K/V update may change
  (method/selective.py), i.e. how much of the update leaks onto it;
- K/V change: how far its cross-attention keys and values moved, relative to their norm (mean over the K/V
  layers); printed for the targets too. What an untargeted concept loses grows with the targets' change
  times its overlap (ImmunizeConfig.kv_budget caps the first, row_contrast narrows the second);
- after MIMA alone (no attack), at the same seeds: the oracle's accuracy on the erased and the immunized model,
  and the mean oracle-embedding cosine of the image pairs (about 1: the same picture; 0.6: noise).
--noise: the oracle's top-1 within each kind on saturated colour noise, the kind of picture a broken model
draws (it was never trained on noise).
"""
import argparse
import collections
import hashlib
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mima_lib.experiment import stages  # noqa: E402
from mima_lib.experiment.config import immunize_config, run_dir_for  # noqa: E402
from mima_lib.experiment.loading import load_experiment  # noqa: E402
from mima_lib.experiment.stages.common import model_for  # noqa: E402
from mima_lib.method.diffusion import generate  # noqa: E402
from mima_lib.method.merge import is_cross_attention_kv  # noqa: E402
from mima_lib.method.selective import relative_change, target_row_projector  # noqa: E402
from mima_lib.method.text_tokens import encode_prompt_tokens  # noqa: E402
from mima_lib.toy.oracle import load_toy_oracle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def saturated_noise(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Smooth colour noise at 4-16 cells per side, pushed to saturation (in [-1, 1])."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        cells = (4, 8, 16)[k % 3]
        z = F.interpolate(torch.randn(1, 3, cells, cells, generator=g), size=(size, size), mode="bilinear")
        out.append(torch.tanh(2.5 * z))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params_file", nargs="?", default=str(ROOT / "papermill_params" / "default.yaml"))
    ap.add_argument("--steps", type=int, default=None, help="MIMA's upper steps (default: the file's)")
    ap.add_argument("--n", type=int, default=8, help="generations per concept")
    ap.add_argument("--run-root", default=str(ROOT / "runs" / "utility_probe"))
    ap.add_argument("--noise", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="KEY.PATH=VALUE override of the file (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    sets = ["immunize.methods=[mima]", "immunize.per_method={}"]
    if args.steps is not None:
        sets.append(f"immunize.settings.steps={args.steps}")
    cfg = load_experiment(args.params_file, sets + args.set)
    sets_key = "-" + hashlib.sha1("|".join(args.set).encode()).hexdigest()[:8] if args.set else ""
    run = run_dir_for(cfg, Path(args.run_root) / f"steps{args.steps or 'file'}{sets_key}")
    stages.make_data(cfg, run)
    stages.erase(cfg, run)
    imm = stages.immunize(cfg, run)

    erased, immunized, oracle = model_for(cfg, run, "no defense"), model_for(cfg, run, "mima"), load_toy_oracle()
    # the projector immunize() used: the targets' prompts against the regularization prompts it recorded
    info, icfg = imm.runs["mima"], immunize_config(cfg, "mima")
    P = target_row_projector(erased, info["concepts"], [p for p in info["reg_prompts"] if p],
                             protect_prompts=icfg.protect_prompts, contrast=icfg.row_contrast,
                             rtol=icfg.row_rtol).double()
    print(f"{cfg.experiment}: targets {cfg.concepts}; selective span of rank {round(float(torch.trace(P)))}")
    W0 = {n: w.detach() for n, w in erased.unet.named_parameters() if is_cross_attention_kv(n)}
    W1 = {n: w.detach() for n, w in immunized.unet.named_parameters() if is_cross_attention_kv(n)}
    kv = list(W0)

    def kv_change(prompt: str) -> float:
        with torch.no_grad():
            rows = encode_prompt_tokens(erased, [prompt], include_padding=True)[0]
        return sum(relative_change(W1[n], W0[n], rows) for n in kv) / len(kv)

    print("  targets' K/V change: " + ", ".join(f"{c} {kv_change(cfg.concept(c).prompt):.2f}" for c in cfg.concepts))
    seeds = list(range(args.n))
    for c in cfg.utility_concepts:
        prompt = cfg.concept(c).prompt
        with torch.no_grad():
            rows = encode_prompt_tokens(erased, [prompt], include_padding=True)[0].double()
        share = float((rows @ P).norm() / rows.norm())
        a = generate(erased, [prompt] * args.n, seeds, cfg.data.sample_steps, cfg.data.guidance)
        b = generate(immunized, [prompt] * args.n, seeds, cfg.data.sample_steps, cfg.data.guidance)
        cos = float((oracle.embed(a) * oracle.embed(b)).sum(1).mean())
        print(f"  {c:>20s}: row share {share:.1%}; K/V change {kv_change(prompt):.2f}; "
              f"oracle {oracle.accuracy(a, c):.0%} -> "
              f"{oracle.accuracy(b, c):.0%}; image cosine {cos:.3f}")
    if args.noise:
        x = saturated_noise(64)
        for kind in ("object", "artist"):
            top = collections.Counter(oracle.predict(x, kind)).most_common(4)
            print(f"  oracle on 64 noise images, within kind {kind!r}: {top}")


if __name__ == "__main__":
    main()
