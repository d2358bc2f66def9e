"""Tests of mima_lib.method.immunize: MIMA's exact hypergradient, the baselines, resume, saving, early errors, and
(on the trained toy model) that immunization raises the merged simulated-attack loss on the targets while
leaving other concepts' loss nearly unchanged."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import mima_lib.method.bilevel as IM  # noqa: E402
from mima_lib.method import diffusion  # noqa: E402
from mima_lib.toy import model as toymodel  # noqa: E402
from mima_lib.toy import world as toyworld  # noqa: E402
from mima_lib.method.bilevel import attack_losses, concept_losses, plain_attention  # noqa: E402
from mima_lib.method.immunize import (ImmunizeConfig, bilevel_loss, config_from_json, immunize,  # noqa: E402
                                      load_immunized, save_immunized)
from mima_lib.method.problem import prepare  # noqa: E402
from mima_lib.toy.data import word_captions  # noqa: E402
from mima_lib.toy.model import TOY_MODEL  # noqa: E402

SMALL = toymodel.ToyModelConfig(image_size=16, text_dim=32, unet_channels=(16, 32), vae_channels=(16, 16))
TARGETS = ["cat", "van gogh"]


def tiny_pipe(dtype=torch.float32):
    """A random-weight toy pipeline small enough for exact float64 second-order checks (0.27 M UNet)."""
    return toymodel.build_pipeline(SMALL, seed=0).to(dtype)


def data(names=TARGETS, n=4, size=16):
    return {toyworld.concept(c).prompt: toyworld.render_many(c, n, size=size) for c in names}


def reg_data(n=4, size=16):
    return toyworld.render_many("artwork", n, size=size)


def tiny_cfg(**kw):
    """Plain-SGD inner steps (the second-order machinery's own tests; the Adam-scaled step: test_sd_path.py),
    no diagnostic steps (callers here run backward themselves)."""
    base = dict(steps=2, inner_lr=1e-2, outer_lr=1e-3, inner_params="xattn", batch_size=1, seed=0,
                inner_scaling="sgd", diagnose_every=0)
    return ImmunizeConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------ early errors
@pytest.mark.parametrize("kw, concepts, message", [
    ({}, {}, "concept_images is empty"),
    ({"inner_params": "everything"}, None, "unknown parameter set 'everything' for inner_params"),
    ({"outer_params": "lora"}, None, "unknown parameter set 'lora' for outer_params"),
    ({}, {"a photo of a cat": []}, "concept 'a photo of a cat' has no images"),
    ({"method": "imma"}, None, "method 'imma' immunizes one concept"),
    ({"method": "maml"}, None, "unknown method 'maml'"),
    ({"order": 3}, None, "order must be 1"),
    ({"inner_lr": 0.0}, None, "inner_lr must be > 0"),
])
def test_bad_settings_fail_early_with_a_clear_message(kw, concepts, message):
    pipe = tiny_pipe()
    with pytest.raises(ValueError, match=message):
        immunize(pipe, data() if concepts is None else concepts, reg_data(), "artwork", tiny_cfg(**kw),
                 progress=False)


def test_missing_regularization_and_wrong_image_size_fail_early():
    pipe = tiny_pipe()
    with pytest.raises(ValueError, match="prior_weight > 0 needs regularization images"):
        immunize(pipe, data(), None, None, tiny_cfg(), progress=False)
    with pytest.raises(ValueError, match="the model makes 16x16 images"):
        immunize(pipe, data(size=32), reg_data(), "artwork", tiny_cfg(), progress=False)


# ------------------------------------------------------------------------------------------ hypergradient
def _precise_loss(unet, noise_scheduler, latents, text_states, generator=None, reduction="mean"):
    """diffusion.noise_prediction_loss without its float32 cast (same draws, same maths), for float64 checks."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                      device=latents.device)
    pred = unet(noise_scheduler.add_noise(latents, noise, t), t, text_states).sample
    per = (pred - noise).pow(2).flatten(1).mean(1)
    return per if reduction == "none" else per.mean()


@pytest.fixture
def float64_loss(monkeypatch):
    # noise_prediction_loss computes the MSE in float32, which leaves central differences with ~1e-4 noise.
    probe = diffusion.noise_prediction_loss(lambda x, t, s: type("O", (), {"sample": x})(),
                                            toymodel.training_scheduler(), torch.zeros(1, 1, 2, 2, dtype=torch.float64),
                                            torch.zeros(1, 1, 1, dtype=torch.float64))
    if probe.dtype != torch.float64:
        monkeypatch.setattr(IM, "noise_prediction_loss", _precise_loss)


@pytest.mark.parametrize("inner, method", [("unet", "mima"), ("xattn-kv", "mima"), ("lora", "mima"),
                                           ("xattn", "imma-joint")])
def test_hypergradient_matches_central_differences(float64_loss, inner, method):
    pipe = tiny_pipe(torch.float64)
    # A large inner step makes the second-order part of the hypergradient dominate, so the first-order
    # gradient is measurably wrong while the exact one must agree with finite differences.
    grads = {}
    for order in (2, 1):
        cfg = tiny_cfg(order=order, inner_params=inner, method=method, inner_lr=10.0, batch_size=2)
        prob = prepare(pipe, data(), reg_data(), "artwork", cfg)
        pipe.unet.requires_grad_(False)
        for k in prob.outer_names:
            prob.params[k].requires_grad_(True)
            prob.params[k].grad = None
        g = torch.Generator().manual_seed(0)
        v = {k: torch.randn(prob.params[k].shape, generator=g, dtype=torch.float64) for k in prob.outer_names}
        norm = torch.sqrt(sum(x.pow(2).sum() for x in v.values()))
        v = {k: x / norm for k, x in v.items()}
        J = lambda: bilevel_loss(prob, 0, torch.Generator().manual_seed(123))[0]  # noqa: E731 (fixed noise)
        with plain_attention(pipe.unet):
            J().backward()
            grads[order] = float(sum((prob.params[k].grad * v[k]).sum() for k in prob.outer_names))
            if order == 2:
                eps = 1e-4

                def shift(s):
                    with torch.no_grad():
                        for k in v:
                            prob.params[k].add_(s * eps * v[k])

                shift(1)
                j_plus = J().item()
                shift(-2)
                j_minus = J().item()
                shift(1)
                fd = (j_plus - j_minus) / (2 * eps)
    rel2 = abs(grads[2] - fd) / abs(fd)
    rel1 = abs(grads[1] - fd) / abs(fd)
    assert rel2 < 1e-2, f"exact hypergradient {grads[2]:.6g} vs central difference {fd:.6g} (rel {rel2:.2e})"
    assert rel1 > 10 * rel2, "the first-order gradient should differ measurably at this inner step size"


# ------------------------------------------------------------------------------------------ loop, baselines
def _unet_state(pipe):
    return {k: v.detach().clone() for k, v in pipe.unet.named_parameters()}


@pytest.mark.parametrize("method, order", [("mima", 2), ("mima", 1), ("imma-joint", 1), ("imma-sequential", 2)])
def test_only_outer_parameters_change(method, order):
    """S_l = whole UNet is adapted in the inner step, but only S_u (attn2) is updated."""
    pipe = tiny_pipe()
    before = _unet_state(pipe)
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    res = immunize(pipe, data(), reg_data(), "artwork", tiny_cfg(method=method, order=order, inner_params="unet"),
                   progress=False)
    after = _unet_state(pipe)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(res.params) and all(".attn2." in k for k in res.params)
    assert len(res.losses) == (2 * len(TARGETS) if method == "imma-sequential" else 2)
    assert all({"target", "prior", "inner_move", "merged_move"} <= set(e) for e in res.extras)
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags  # restored after the run


def test_unconditional_prior_preserves_the_empty_prompt_on_every_regularization_image():
    pipe = tiny_pipe()
    reg = {"artwork": reg_data(3), "a photo of an object": toyworld.render_many("cup", 2, size=16)}
    plain = prepare(pipe, data(), reg, None, tiny_cfg())
    uncond = prepare(pipe, data(), reg, None, tiny_cfg(prior_unconditional=True))
    assert plain.reg_prompts == ["artwork", "a photo of an object"]
    assert uncond.reg_prompts == plain.reg_prompts + [""]
    assert torch.equal(uncond.prior_latents[-1], torch.cat(plain.prior_latents))  # all 5 images, once
    assert torch.equal(uncond.prior_states[-1], diffusion.encode_prompts(pipe, [""])[0])
    res = immunize(pipe, data(), reg, None, tiny_cfg(prior_unconditional=True), progress=False)
    assert all(torch.isfinite(torch.tensor(res.losses)))


def test_single_concept_imma_runs():
    pipe = tiny_pipe()
    res = immunize(pipe, data(["cat"]), reg_data(), "artwork", tiny_cfg(method="imma", inner_params="lora"),
                   progress=False)
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))


@pytest.mark.parametrize("method, order, hypergrad", [("mima", 2, "autograd"), ("imma-sequential", 1, "autograd"),
                                                     ("mima", 2, "hvp")])
def test_resumed_run_equals_uninterrupted_run(tmp_path, method, order, hypergrad):
    cfg = tiny_cfg(method=method, order=order, steps=2, checkpoint_every=1, inner_params="unet", hypergrad=hypergrad)
    total = 2 * len(TARGETS) if method == "imma-sequential" else 2
    full = immunize(tiny_pipe(), data(), reg_data(), "artwork", cfg, checkpoint_dir=tmp_path / "a", progress=False)

    def crash(step):  # train() calls on_step before it writes that step's checkpoint
        if step == total:
            raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        immunize(tiny_pipe(), data(), reg_data(), "artwork", cfg, checkpoint_dir=tmp_path / "b", progress=False,
                 on_step=crash)
    resumed = immunize(tiny_pipe(), data(), reg_data(), "artwork", cfg, checkpoint_dir=tmp_path / "b",
                       progress=False)
    assert resumed.resumed_from == total - 1
    assert resumed.losses == full.losses
    for k, v in full.params.items():
        assert torch.equal(v, resumed.params[k]), k


def test_save_and_load_only_the_changed_parameters(tmp_path):
    pipe = tiny_pipe()
    res = immunize(pipe, data(), reg_data(), "artwork", tiny_cfg(outer_params="xattn-kv"), progress=False)
    folder = save_immunized(res, tmp_path / "imm")
    from safetensors.torch import load_file

    saved = load_file(str(folder / "immunized.safetensors"))
    assert set(saved) == set(res.params) and all(k.endswith(("to_k.weight", "to_v.weight")) for k in saved)
    fresh = tiny_pipe()
    info = load_immunized(fresh, folder)
    assert info["config"]["outer_params"] == "xattn-kv" and info["concepts"] == list(data())
    assert config_from_json(info) == res.config
    for k, v in _unet_state(fresh).items():
        assert torch.equal(v, _unet_state(pipe)[k]), k
    other = toymodel.build_pipeline(toymodel.ToyModelConfig(image_size=16, text_dim=32, unet_channels=(32, 64),
                                                            vae_channels=(16, 16)))
    with pytest.raises(ValueError, match="made for another model"):
        load_immunized(other, folder)
    with pytest.raises(FileNotFoundError, match="immunized.safetensors"):
        load_immunized(fresh, tmp_path)


# ------------------------------------------------------------------------------------------ behaviour (trained toy)
HELD_OUT = ["dog", "claude monet", "cup", "katsushika hokusai", "car"]  # trained, not immunized here
PRIOR = ["tree", "fish", "pablo picasso"]  # tests/test_selectivity.py's


@pytest.mark.skipif(not (TOY_MODEL / "model_index.json").exists(), reason="the trained toy model is not built yet")
def test_mima_raises_merged_attack_loss_on_targets_and_spares_other_concepts(toy_pipe_factory):
    """Tolerance: the targets' merged simulated-attack loss rises by >= 15% (measured on v4 with the toy
    defaults, selective rows, 15 steps: +1668% cat, +558% van gogh; v2: +898% / +381%); every untargeted
    concept's plain loss moves by <= 25% (measured: within 0.01%; v2: -0.1..+12.5%) and on average by less than
    60% of the targets' mean rise. The same run with outer_rows='all' (the paper's free S_u) must damage them
    more: measured +35..+212% (v2: +49..+204%)."""
    pipe = toy_pipe_factory()
    train_data = {toyworld.concept(c).prompt: toyworld.render_many(c, 8) for c in TARGETS}
    evaluation = {toyworld.concept(c).prompt: toyworld.render_many(c, 8, start_seed=1000) for c in TARGETS}
    held = {toyworld.concept(c).prompt: toyworld.render_many(c, 8, start_seed=1000) for c in HELD_OUT}
    # the prior as the experiment layer gives it: other concepts of both kinds (data.regularization_concepts).
    # They share the templates with the targets, so the selective rows start at the names; with the generic
    # prompts alone ("artwork" shares nothing with "an artwork of van gogh") the rows of "an artwork of" count
    # as van gogh's own, and on v4 their K/V moved 2.3x and hokusai's loss rose +105%
    reg = {toyworld.concept(c).prompt: toyworld.render_many(c, 8) for c in PRIOR}
    cfg = ImmunizeConfig.toy(steps=15, order=2)
    caps = word_captions(exclude_names=TARGETS)  # the toy's C_reg, as the experiment layer gives it
    before, held_before = attack_losses(pipe, evaluation, cfg, caps)["merged"], concept_losses(pipe, held)
    res = immunize(pipe, train_data, reg, None, cfg, reg_captions=caps, progress=False)
    after, held_after = attack_losses(pipe, evaluation, cfg, caps)["merged"], concept_losses(pipe, held)
    rise = {p: after[p] / before[p] - 1 for p in before}
    held_rise = {p: held_after[p] / held_before[p] - 1 for p in held}
    print(f"\ntarget merged-attack loss {before} -> {after}\nheld-out plain loss {held_before} -> {held_after}\n"
          f"{res.seconds_per_step:.2f} s/step")
    mean_rise = sum(rise.values()) / len(rise)
    assert min(rise.values()) >= 0.15, rise
    assert max(abs(r) for r in held_rise.values()) <= 0.25, held_rise
    assert sum(held_rise.values()) / len(held_rise) < 0.6 * mean_rise, (held_rise, rise)
    # the selective rows are what spares them: without the projection the untargeted losses rise far more
    free = toy_pipe_factory()
    immunize(free, train_data, reg, None, ImmunizeConfig.toy(steps=15, order=2, outer_rows="all"),
             reg_captions=caps, progress=False)
    free_rise = {p: v / held_before[p] - 1 for p, v in concept_losses(free, held).items()}
    print(f"held-out plain loss rise with outer_rows='all': {free_rise}")
    assert min(free_rise.values()) > max(held_rise.values()), (free_rise, held_rise)
