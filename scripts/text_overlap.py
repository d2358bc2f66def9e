"""How much of the targets' text span an untargeted concept's rows share: judge a toy text encoder before any
UNet is trained on it (issue #14's bar 4).

    python scripts/text_overlap.py mima_lib/toy/assets/toy_sd --three-sets [--rtol 1e-3]  # the default (v4)
    python scripts/text_overlap.py mima_lib/toy/assets/toy_sd_v2                   # the earlier v2
    python scripts/text_overlap.py BUILD/_work/text_final.pt --text-dim 256        # a build's text stage
    python scripts/text_overlap.py --pretrain --seed 1 --save F                    # pretrain a candidate first

MIMA's selective update moves cross-attention K/V only along the targets' own rows, so an untargeted concept
moves by about the targets' K/V change times its share of that span (`mima_lib.toy.text.span_share`, built as
immunize() builds its projector; --rtol is ImmunizeConfig.row_rtol). On the v2 model (128-d, spread 30) the
shares were 0.19-0.35 and the 45 default steps, which push the targets' K/V to 5-9 times their norm, lost cup;
on v4 at most 0.010 (0.004 with --rtol 0.1) over --three-sets. Prints `text_statistics` and each untargeted share.
--pretrain with the defaults is v4's text stage (the build's defaults).
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from mima_lib.method.problem import ImmunizeConfig
from mima_lib.toy import world
from mima_lib.toy.build import BuildConfig
from mima_lib.toy.model import ToyModelConfig
from mima_lib.toy.text import build_text_encoder, build_tokenizer, pretrain_text_encoder, span_share, text_statistics

TARGETS = ["cat", "umbrella", "car", "van gogh", "claude monet", "kelly mckernan"]
OTHERS = ["cup", "flower", "kirbi fagan", "tyler edlin", "katsushika hokusai", "dog", "pablo picasso", "boat"]
# --three-sets: the README's table: the bar's targets, a held-out six, a third six; others = every other base
# concept and boat
SETS = [TARGETS, ["dog", "fish", "apple", "tyler edlin", "kilian eng", "pablo picasso"],
        ["bird", "tree", "cup", "kirbi fagan", "thomas kinkade", "katsushika hokusai"]]


def load_encoder(source: str | None, text_dim: int, tok):
    if source is None:
        return build_text_encoder(tok, ToyModelConfig(text_dim=text_dim), 0)
    path = Path(source)
    if path.is_dir():
        from transformers import CLIPTextModel

        folder = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        return CLIPTextModel.from_pretrained(folder, torch_dtype=torch.float32)
    if not path.is_file():
        raise SystemExit(f"{source}: no such model folder or text-stage checkpoint (text_final.pt)")
    enc = build_text_encoder(tok, ToyModelConfig(text_dim=text_dim), 0)
    try:
        enc.load_state_dict(torch.load(path))
    except RuntimeError as err:
        raise SystemExit(f"{source} does not fit a {text_dim}-d encoder; pass its --text-dim ({err})") from None
    return enc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", help="a toy model folder, its text_encoder folder, or a text_final.pt")
    ap.add_argument("--text-dim", type=int, default=ToyModelConfig.text_dim)
    ap.add_argument("--pretrain", action="store_true", help="pretrain (from source, or a fresh init) first")
    # --pretrain's defaults are the build's (v4's text stage); v2's: --spread 30 --span-weight 0 --hinge-weight 0
    ap.add_argument("--spread", type=float, default=BuildConfig.text_spread, help="--pretrain: the spread term's weight")
    ap.add_argument("--span-weight", type=float, default=BuildConfig.text_span_weight,
                    help="--pretrain: > 0 the span spread (v4)")
    ap.add_argument("--hinge-weight", type=float, default=BuildConfig.text_hinge_weight,
                    help="--pretrain: with --span-weight")
    ap.add_argument("--steps", type=int, default=BuildConfig.text_steps, help="--pretrain: steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", nargs="+", default=TARGETS)
    ap.add_argument("--others", nargs="+", default=OTHERS)
    ap.add_argument("--three-sets", action="store_true", help="the README's three target sets, every other concept")
    ap.add_argument("--rtol", type=float, default=ImmunizeConfig.toy().row_rtol,
                    help="the projector's rtol (ImmunizeConfig.row_rtol; the toy default)")
    ap.add_argument("--save", help="write the encoder's state dict here (a SOURCE for later runs, with --text-dim)")
    args = ap.parse_args()
    if args.source is None and not args.pretrain:
        ap.error("give a source, or --pretrain to train a fresh encoder")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    folder = Path(args.source or "") / "tokenizer"
    tok = (CLIPTokenizer.from_pretrained(folder) if args.source and folder.is_dir()  # a model folder's own
           else build_tokenizer(max_tokens=ToyModelConfig.max_tokens))
    enc = load_encoder(args.source, args.text_dim, tok)
    if args.pretrain:
        t0 = time.time()
        pretrain_text_encoder(tok, enc, args.steps, seed=args.seed, progress=False, spread_weight=args.spread,
                              span_weight=args.span_weight, hinge_weight=args.hinge_weight)
        print(f"pretrained {args.steps} steps (spread {args.spread}) in {time.time() - t0:.0f} s")
    enc.eval()
    if args.save:
        torch.save(enc.state_dict(), args.save)
    dim = enc.config.hidden_size
    stats = text_statistics(tok, enc)
    print(json.dumps({"text_dim": dim, **{k: round(v, 4) for k, v in stats.items()}}))
    for targets in SETS if args.three_sets else [args.targets]:
        others = ([c for c in world.BASE_OBJECTS + world.BASE_ARTISTS if c not in targets] + ["boat"]
                  if args.three_sets else args.others)
        share = span_share(tok, enc, targets, others, args.rtol)
        print(f"share of the targets' span ({', '.join(targets)}), text_dim {dim}, rtol {args.rtol}:")
        print("  " + ", ".join(f"{c} {v:.3f}" for c, v in share.items()) + f"; max {max(share.values()):.3f}")


if __name__ == "__main__":
    main()
