"""Compare two toy oracles on the attack snapshots of finished runs (issue #14: the oracle's "noise" label).

    python scripts/oracle_compare.py OLD_ORACLE_DIR NEW_ORACLE_DIR RUN_DIR [RUN_DIR ...]

RUN_DIR is any folder holding runs of scripts/toy_bars.py or the experiment runner: every
attacks/<model>/<concept>/<attack>/seed<k>/snapshots.safetensors below it is read. Prints, for the new oracle
against the old:
- on the no-defense snapshots from step 20 on that the old oracle reads as their concept (re-learned
  pictures): how many the new one agrees on, and what it answers instead;
- on the immunized models' target snapshots: how many each oracle reads as the target, and how many the new
  one calls noise.
"""
import argparse
import collections
from pathlib import Path

from safetensors.torch import load_file

from mima_lib.toy import world
from mima_lib.toy.oracle import NOISE, ToyOracle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    old, new = ToyOracle.load(args.old), ToyOracle.load(args.new)
    agree = real = 0
    instead = collections.Counter()
    hits = collections.Counter()
    for run in args.runs:
        for f in sorted(Path(run).glob("**/attacks/*/*/*/seed*/snapshots.safetensors")):
            model, concept = f.parts[-5].replace("_", " "), f.parts[-4].replace("_", " ")
            if not world.knows(concept) or concept == "boat":  # boat: the harmless fine-tune, not a target
                continue
            kind = world.concept(concept).kind
            for step, images in load_file(f).items():
                p_old, p_new = old.predict(images, kind), new.predict(images, kind)
                if model == "no defense" and int(step) >= 20:
                    for a, b in zip(p_old, p_new):
                        if a == concept:
                            real += 1
                            agree += b == concept
                            if b != concept:
                                instead[(concept, b)] += 1
                elif model != "no defense":
                    hits["images"] += len(p_new)
                    hits["old"] += sum(p == concept for p in p_old)
                    hits["new"] += sum(p == concept for p in p_new)
                    hits["noise"] += sum(p == NOISE for p in p_new)
    if real:
        print(f"re-learned pictures (no defense, step >= 20, read as their concept by the old oracle): the new "
              f"one agrees on {agree}/{real} = {agree / real:.3f}")
        print("  instead:", ", ".join(f"{c} -> {b}: {n}" for (c, b), n in instead.most_common(12)))
    if hits["images"]:
        print(f"immunized models' target snapshots: {hits['images']} images; read as the target: old "
              f"{hits['old']}, new {hits['new']}; new reads noise: {hits['noise']}")


if __name__ == "__main__":
    main()
