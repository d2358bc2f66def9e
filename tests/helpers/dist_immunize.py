"""Concept-parallel immunization runs for tests/test_distributed.py.

    accelerate launch --multi_gpu --num_processes 2 tests/helpers/dist_immunize.py OUT_DIR VARIANT [VARIANT ...]

Every process runs :func:`mima_lib.method.distributed.immunize_distributed` (gloo on the CPU) for each named variant
and writes OUT_DIR/{variant}_rank{r}.pt with the changed parameters, the per-step losses and the gradient of
the first step. The test imports :func:`run_single`, :func:`one_gradient` and :data:`VARIANTS` from here to
run the same problems in one process.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from mima_lib.toy import model as toymodel  # noqa: E402
from mima_lib.toy import world as toyworld  # noqa: E402
from mima_lib.toy.data import word_captions  # noqa: E402  (the toy's C_reg, as the experiment gives it)
from mima_lib.method.immunize import ImmunizeConfig, immunize  # noqa: E402

SMALL = toymodel.ToyModelConfig(image_size=16, text_dim=32, unet_channels=(16, 32), vae_channels=(16, 16))
CONCEPTS = ["cat", "van gogh", "dog"]  # three concepts on two processes: an uneven split
BASE = dict(steps=2, inner_lr=1.0, outer_lr=1e-3, batch_size=2, seed=0, hypergrad="hvp", inner_scaling="sgd")
VARIANTS = {
    # exact (order 2) through the whole-UNet attack, central differences, SGD: the update is beta * gradient
    "o2_unet_central": dict(order=2, inner_params="unet", hvp_scheme="central", optimizer="sgd", dtype="float64"),
    # LoRA attacker, forward differences, prior on the immunized weights, two concepts per upper chunk
    "o2_lora_forward": dict(order=2, inner_params="lora", hvp_scheme="forward", prior_on="immunized",
                            concept_chunk=2, optimizer="sgd", dtype="float64"),
    # float32: the exact forward-over-reverse HVP, and central differences
    "o2_kv_jvp_f32": dict(order=2, inner_params="xattn-kv", hvp_scheme="jvp", optimizer="sgd", dtype="float32"),
    "o2_xattn_central_f32": dict(order=2, inner_params="xattn", hvp_scheme="central", optimizer="sgd",
                                 dtype="float32"),
    # streamed first order with AdamW
    "o1_xattn_adamw": dict(order=1, inner_params="xattn", dtype="float32"),
}


def problem(variant: str):
    kw = dict(VARIANTS[variant])
    dtype = getattr(torch, kw.pop("dtype"))
    pipe = toymodel.build_pipeline(SMALL, seed=0).to(dtype)
    data = {toyworld.concept(c).prompt: toyworld.render_many(c, 4, size=16) for c in CONCEPTS}
    reg = toyworld.render_many("artwork", 4, size=16)
    return pipe, data, reg, ImmunizeConfig(**{**BASE, **kw})


def run_single(variant: str):
    pipe, data, reg, cfg = problem(variant)
    before = {k: v.detach().clone() for k, v in pipe.unet.named_parameters()}
    res = immunize(pipe, data, reg, "artwork", cfg, reg_captions=word_captions(), progress=False)
    return before, res


def one_gradient(variant: str, comm=None) -> dict:
    """dJ/dS_u of the first outer step at the initial weights (one process when ``comm`` is None)."""
    from mima_lib.method.hypergrad import streamed_step
    from mima_lib.method.problem import prepare

    pipe, data, reg, cfg = problem(variant)
    prob = prepare(pipe, data, reg, "artwork", cfg, word_captions())
    pipe.unet.requires_grad_(False)
    streamed_step(prob, 0, torch.Generator().manual_seed(cfg.seed), comm)
    return {k: prob.params[k].grad.clone() for k in prob.outer_names}


def main(out: str, variants: list[str]) -> None:
    from accelerate import Accelerator

    from mima_lib.method.distributed import TorchComm, immunize_distributed

    acc = Accelerator(cpu=True)
    for variant in variants:
        grad = one_gradient(variant, TorchComm())
        pipe, data, reg, cfg = problem(variant)
        res = immunize_distributed(pipe, data, reg, "artwork", cfg, reg_captions=word_captions(), progress=False,
                                   accelerator=acc)
        torch.save({"params": res.params, "losses": res.losses, "extras": res.extras, "grad": grad,
                    "world": acc.num_processes},
                   os.path.join(out, f"{variant}_rank{acc.process_index}.pt"))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
