"""A small real training run used by the kill-and-resume test: a toy UNet step on random latents.

    python tests/helpers/train_small.py OUT_DIR STEPS [SLEEP_PER_STEP]
"""
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from mima_lib.toy import model as toymodel  # noqa: E402
from mima_lib.method.diffusion import noise_prediction_loss  # noqa: E402
from mima_lib.method.training import TrainConfig, train  # noqa: E402


def main(out: Path, steps: int, pause: float) -> None:
    torch.manual_seed(0)
    cfg = toymodel.ToyModelConfig(unet_channels=(16, 32), attention_head_dim=4)
    unet = toymodel.build_unet(cfg)
    sched = toymodel.training_scheduler()
    latents, states = torch.randn(8, 4, 16, 16), torch.randn(8, 16, cfg.text_dim)

    def step_fn(step, gen):
        idx = torch.randint(0, 8, (2,), generator=gen)
        if pause:
            time.sleep(pause)
        return noise_prediction_loss(unet, sched, latents[idx], states[idx], generator=gen)

    result = train(step_fn, dict(unet.named_parameters()),
                   TrainConfig(steps=steps, lr=1e-3, seed=3, checkpoint_every=1, desc="small"),
                   checkpoint_dir=out, progress=False)
    torch.save({"params": unet.state_dict(), "losses": result.losses}, out / "final.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
