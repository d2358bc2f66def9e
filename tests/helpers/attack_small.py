"""A short LoRA attack on the toy model, checkpointed every step: the kill-and-resume test's subject.

    python tests/helpers/attack_small.py OUT_DIR
"""
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from mima_lib.toy import world as toyworld  # noqa: E402
from mima_lib.method.tensor_io import save_tensors  # noqa: E402
from mima_lib.attacks import run_attack  # noqa: E402
from mima_lib.toy.model import load_toy_pipeline  # noqa: E402

STEPS, SNAPSHOTS = 40, [0, 10, 20, 30, 40]


def main(out: Path) -> None:
    pipe = load_toy_pipeline()
    images = toyworld.render_many("boat", 8, 20_000)
    result = run_attack("lora", pipe, images, "a photo of a boat", {"steps": STEPS, "snapshot_steps": SNAPSHOTS},
                        defaults="toy",
                        snapshot_prompts=["a photo of a boat"] * 2, snapshot_seeds=[0, 1], sample_steps=4,
                        checkpoint_dir=out / "checkpoint", checkpoint_every=1, progress=False)
    lora = {n: p.detach() for n, p in pipe.unet.named_parameters() if "lora" in n}
    save_tensors({**{f"snap{k}": v for k, v in result.snapshots.items()}, **lora}, out / "final.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
