"""Time one click of the teaching demo (notebooks/demo_widgets) with the notebook's default values.

    python scripts/time_demo.py                      # the defaults: what one click runs
    python scripts/time_demo.py cat umbrella --attack-steps 60

Prints wall seconds per phase (erase, immunize, attack) and the process's CPU seconds: on a machine shared with
other jobs the wall time says little, and CPU time over the torch threads bounds the idle-machine time.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import jupytext
    import torch

    from mima_lib.experiment import demo

    nb = jupytext.read(os.path.join(os.path.dirname(__file__), "..", "notebooks", "demo_widgets.py"))
    defaults: dict = {}
    exec(next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", [])), defaults)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("concepts", nargs="*", default=defaults["concepts"])
    ap.add_argument("--method", default=defaults["method"])
    ap.add_argument("--immunize-steps", type=int, default=defaults["immunize_steps"])
    ap.add_argument("--attack-steps", type=int, default=defaults["attack_steps"])
    args = ap.parse_args()
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    result = demo.run_demo(args.concepts, args.method, args.immunize_steps, args.attack_steps, progress=False)
    demo.before_after(result), demo.attack_curves(result), demo.accuracy_table(result)  # what the click shows
    wall, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    print(f"one click, {args.concepts} {args.method} immunize {args.immunize_steps} attack {args.attack_steps}: "
          f"wall {wall:.1f} s ({phases}); CPU {cpu:.1f} s on {torch.get_num_threads()} torch thread(s)")
    print(demo.accuracy_table(result))


if __name__ == "__main__":
    main()
