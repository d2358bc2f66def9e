"""Adaptation attacks (LoRA, DreamBooth, Textual Inversion, Custom Diffusion) and the attacker's data.

Fast tests run on the untrained toy pipeline (toymodel.build_pipeline); the behavioural ones use the
trained toy model and its oracle: UCE erases 'cat', the oracle no longer sees cats, and each attack on
the erased (non-immunized) model brings them back (re-learning works, >= 60%).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from mima_lib.attacks import data as attack_data  # noqa: E402
from mima_lib.toy import data as toy_data  # noqa: E402
from mima_lib.toy import model as toymodel  # noqa: E402
from mima_lib.toy import world as toyworld  # noqa: E402
from mima_lib.attacks import (ATTACKS, CustomDiffusionSettings, LoraSettings, TextualInversionSettings,  # noqa: E402
                              copy_pipeline, custom_diffusion_multi_attack, load_attack, make_settings, run_attack,
                              save_attack, textual_inversion_attack)
from mima_lib.method.diffusion import encode_prompts  # noqa: E402

CAT = "a photo of a cat"
QUICK = dict(snapshot_steps=(), progress=False)  # no snapshot generation in the plumbing tests


@pytest.fixture(scope="module")
def tiny():
    """The untrained toy pipeline: same classes and sizes as the trained one, built in 0.2 s."""
    return toymodel.build_pipeline(seed=0)


@pytest.fixture(scope="module")
def cat_images():
    return toy_data.toy_attack_data("cat", n=8)[0]


def _unet_out(pipe, prompt):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([100, 700])
    with torch.no_grad():
        return pipe.unet(x, t, encode_prompts(pipe, [prompt] * 2)).sample


# ---- attacker data: the folder layout and its validation --------------------------------------------

def test_export_and_load_toy_concept(tmp_path):
    folder = toy_data.export_toy_concept(tmp_path / "cat", "cat")
    data = attack_data.load_concept_folder(folder, size=32)
    assert len(data) == 20 and data.prompt == CAT
    assert (folder / "metadata.csv").read_text().splitlines()[0] == "file_name,prompt"
    ref = toyworld.render("cat", attack_data.ATTACKER_SEED)
    assert np.array_equal(np.asarray(data.images[0]), np.asarray(ref))  # PNG is lossless
    pers = attack_data.load_concept_folder(toy_data.export_toy_concept(tmp_path / "pc", "purple cat",
                                                                          "personalization"))
    assert pers.prompt == "a photo of <new1> cat"


def test_toy_instances_are_new_concepts():
    assert len(toyworld.INSTANCES) >= 4
    for name, cls in toyworld.INSTANCES.items():
        images, prompt = toy_data.toy_attack_data(name, "personalization")
        assert len(images) == 20 and prompt == f"a photo of <new1> {cls}"
        assert toyworld.concept(name).class_prompt == f"a photo of a {cls}"
    assert toyworld.concept("cat").textual_inversion_prompt("<new1>") == "a photo of a <new1>"
    with pytest.raises(ValueError, match="instance"):
        toy_data.toy_attack_data("purple cat", "relearning")


def _write(folder, n=3, size=32):
    return attack_data.write_concept_folder(folder, toyworld.render_many("dog", n, size=size), "a photo of a dog")


def test_concept_folder_errors(tmp_path):
    load = attack_data.load_concept_folder
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load(tmp_path / "empty")

    f = _write(tmp_path / "notes")
    (f / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"not images: \['notes.txt'\]"):
        load(f)

    f = _write(tmp_path / "corrupt")
    data = (f / "0001.png").read_bytes()
    (f / "0001.png").write_bytes(data[:60] + b"\0" * 20 + data[80:])  # damage a chunk: CRC mismatch
    with pytest.raises(ValueError, match="0001.png is not a readable image"):
        load(f)
    (f / "0001.png").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="0001.png is not a readable image"):
        load(f)

    f = _write(tmp_path / "sizes")
    toyworld.render("dog", 9, size=40).save(f / "0001.png")
    with pytest.raises(ValueError, match="mismatched sizes"):
        load(f)
    assert {im.size for im in load(f, size=32, resize=True).images} == {(32, 32)}

    f = _write(tmp_path / "rows")
    toyworld.render("dog", 9).save(f / "extra.png")
    with pytest.raises(ValueError, match=r"no row for \['extra.png'\]"):
        load(f)
    (f / "extra.png").unlink()
    (f / "0002.png").unlink()
    with pytest.raises(ValueError, match=r"not in .*\['0002.png'\]"):
        load(f)

    f = _write(tmp_path / "nometa")
    (f / "metadata.csv").unlink()
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        load(f)
    f = _write(tmp_path / "badcols")
    (f / "metadata.csv").write_text("name,caption\n0000.png,x\n")
    with pytest.raises(ValueError, match="file_name"):
        load(f)

    f = _write(tmp_path / "big", size=48)
    with pytest.raises(ValueError, match="48x48 but the model takes 32x32"):
        load(f, size=32)


# ---- invalid attack inputs -------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(ATTACKS))
def test_attack_rejects_bad_images(method, tiny, cat_images):
    prompt = "a photo of a <new1>" if method == "textual_inversion" else CAT
    with pytest.raises(ValueError, match="no attack images"):
        run_attack(method, tiny, [], prompt, {"steps": 1}, copy=True, defaults="toy", **QUICK)
    mixed = cat_images[:2] + [cat_images[2].resize((40, 40))]
    with pytest.raises(ValueError, match="mismatched sizes"):
        run_attack(method, tiny, mixed, prompt, {"steps": 1}, copy=True, defaults="toy", **QUICK)
    with pytest.raises(ValueError, match="40x40 but the model makes 32x32"):
        run_attack(method, tiny, [im.resize((40, 40)) for im in cat_images], prompt, {"steps": 1}, copy=True, defaults="toy",
                   **QUICK)


def test_new_token_errors(tiny, cat_images):
    pipe = copy_pipeline(tiny)
    n_vocab = len(pipe.tokenizer)
    with pytest.raises(ValueError, match="'cat' is already in the tokenizer's vocabulary"):
        textual_inversion_attack(pipe, cat_images, CAT, TextualInversionSettings.toy(token="cat", steps=1), **QUICK)
    with pytest.raises(ValueError, match="does not contain the placeholder token"):
        textual_inversion_attack(pipe, cat_images, CAT, TextualInversionSettings.toy(steps=1), **QUICK)
    with pytest.raises(ValueError, match="single token"):
        textual_inversion_attack(pipe, cat_images, "a photo of a <new1>",
                                 TextualInversionSettings.toy(steps=1, initializer_token="zzqx"), **QUICK)
    assert len(pipe.tokenizer) == n_vocab  # failed attacks left the model untouched
    textual_inversion_attack(pipe, cat_images, "a photo of a <new1>", TextualInversionSettings.toy(steps=1), **QUICK)
    with pytest.raises(ValueError, match="'<new1>' is already in the tokenizer's vocabulary"):  # added above
        run_attack("custom_diffusion", pipe, cat_images, "a photo of <new1> cat",
                   {"steps": 1, "modifier_token": "<new1>"}, defaults="toy", **QUICK)


def test_settings_and_registry_errors(tiny, cat_images):
    with pytest.raises(KeyError, match="unknown attack"):
        run_attack("ddpo", tiny, cat_images, CAT)
    with pytest.raises(ValueError, match=r"unknown lora settings \['rnak'\]"):
        make_settings("lora", {"rnak": 8})
    assert make_settings("ti", {"steps": 7}, "toy").steps == 7
    assert make_settings("lora", None, "paper") == LoraSettings()
    assert LoraSettings().steps == 400 and LoraSettings().batch_size == 4 and 400 in LoraSettings().snapshot_steps
    with pytest.raises(TypeError, match="through the attack's settings"):
        run_attack("lora", tiny, cat_images, CAT, copy=True, defaults="toy", batch_size=2)


# ---- save / load round trips (in diffusers' formats) ---------------------------------------------------

@pytest.mark.parametrize("method", sorted(ATTACKS))
def test_adapter_round_trip(method, tiny, cat_images, tmp_path):
    prompt = {"textual_inversion": "a photo of a <new1>", "custom_diffusion": "a photo of <new1> cat"}.get(method, CAT)
    settings = {"steps": 2, "lr": 1e-2}
    if method == "custom_diffusion":
        settings.update(modifier_token="<new1>", train_q_out=True)
    result = run_attack(method, tiny, cat_images, prompt, settings, copy=True, defaults="toy", **QUICK)
    assert result.pipe is not tiny and result.method == method and len(result.losses) == 2
    assert not torch.allclose(_unet_out(result.pipe, prompt), _unet_out(tiny, prompt))  # it learned something
    save_attack(result, tmp_path / method)
    reloaded = load_attack(method, copy_pipeline(tiny), tmp_path / method)
    torch.testing.assert_close(_unet_out(reloaded, prompt), _unet_out(result.pipe, prompt), rtol=0, atol=1e-6)


def test_native_diffusers_loaders(tiny, cat_images, tmp_path):
    """What the attacks save loads with diffusers' own pipeline methods."""
    r = run_attack("lora", tiny, cat_images, CAT, {"steps": 2, "lr": 1e-2, "alpha": 8.0}, copy=True, defaults="toy", **QUICK)
    save_attack(r, tmp_path / "lora")
    p = copy_pipeline(tiny)
    p.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(_unet_out(p, CAT), _unet_out(r.pipe, CAT), rtol=0, atol=1e-6)  # alpha kept

    r = run_attack("ti", tiny, cat_images, "a photo of a <new1>", {"steps": 2}, copy=True, defaults="toy", **QUICK)
    save_attack(r, tmp_path / "ti")
    p = copy_pipeline(tiny)
    p.load_textual_inversion(str(tmp_path / "ti"))
    torch.testing.assert_close(encode_prompts(p, ["a photo of a <new1>"]),
                               encode_prompts(r.pipe, ["a photo of a <new1>"]))

    r = run_attack("cd", tiny, cat_images, "a photo of <new1> cat", {"steps": 2, "lr": 1e-2,
                                                                     "modifier_token": "<new1>"}, copy=True,
                   defaults="toy", **QUICK)
    save_attack(r, tmp_path / "cd")
    p = copy_pipeline(tiny)
    p.unet.load_attn_procs(str(tmp_path / "cd"), weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=p)
    p.load_textual_inversion(str(tmp_path / "cd"), weight_name="<new1>.safetensors")
    torch.testing.assert_close(_unet_out(p, "a photo of <new1> cat"), _unet_out(r.pipe, "a photo of <new1> cat"),
                               rtol=1e-4, atol=1e-5)


def test_multi_vector_textual_inversion(tiny, cat_images, tmp_path):
    """num_vectors: 2 adds <new1> and <new1>_1 and trains both rows; diffusers' loader reloads them from one
    (2, dim) entry, and its pipeline expands the short prompt "... <new1>" to both tokens as training saw them."""
    r = run_attack("ti", tiny, cat_images, "a photo of a <new1>", {"steps": 3, "num_vectors": 2}, copy=True,
                   defaults="toy", **QUICK)
    assert r.tokens == ["<new1>", "<new1>_1"]
    weight, n_old = r.pipe.text_encoder.get_input_embeddings().weight, len(tiny.tokenizer)
    init = tiny.text_encoder.get_input_embeddings().weight[tiny.tokenizer.convert_tokens_to_ids("object</w>")]
    assert all(not torch.allclose(weight[n_old + i], init) for i in range(2))  # both rows were trained
    path = save_attack(r, tmp_path / "ti")
    from safetensors.torch import load_file

    assert {k: tuple(v.shape) for k, v in load_file(path).items()} == {"<new1>": (2, weight.shape[1])}
    p = copy_pipeline(tiny)
    p.load_textual_inversion(str(tmp_path / "ti"))
    assert p.maybe_convert_prompt("a photo of a <new1>", p.tokenizer) == "a photo of a <new1> <new1>_1"
    long = "a photo of a <new1> <new1>_1"
    torch.testing.assert_close(encode_prompts(p, [long]), encode_prompts(r.pipe, [long]))
    with pytest.raises(ValueError, match="num_vectors must be >= 1"):
        run_attack("ti", tiny, cat_images, "a photo of a <new1>", {"steps": 1, "num_vectors": 0}, copy=True,
                   defaults="toy", **QUICK)


def test_deterministic_snapshots_and_frozen_parts(tiny, cat_images):
    kw = dict(snapshot_steps=(0, 2), sample_steps=3, snapshot_prompts=[CAT] * 2, progress=False)
    a = run_attack("lora", tiny, cat_images, CAT, {"steps": 2}, copy=True, defaults="toy", **kw)
    b = run_attack("lora", tiny, cat_images, CAT, {"steps": 2}, copy=True, defaults="toy", **kw)
    assert a.losses == b.losses and sorted(a.snapshots) == [0, 2] and a.snapshot_seeds == [0, 1]
    for s in a.snapshots:
        assert torch.equal(a.snapshots[s], b.snapshots[s])
    assert a.images_at(2).shape == (2, 3, 32, 32)
    # Textual Inversion changes the new token's row only; the models' weights stay as they were
    r = run_attack("ti", tiny, cat_images, "a photo of a <new1>", {"steps": 3}, copy=True, defaults="toy", **QUICK)
    old, new = tiny.text_encoder.get_input_embeddings().weight, r.pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(new[: len(old)], old)
    for (n, p), (_, q) in zip(tiny.unet.named_parameters(), r.pipe.unet.named_parameters()):
        assert torch.equal(p, q), n
    # Custom Diffusion changes attn2 K/V only
    r = run_attack("cd", tiny, cat_images, CAT, {"steps": 2}, copy=True, defaults="toy", **QUICK)
    changed = {n for (n, p), (_, q) in zip(tiny.unet.named_parameters(), r.pipe.unet.named_parameters())
               if not torch.equal(p, q)}
    assert changed and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)


def test_checkpoint_resume_matches_uninterrupted(tiny, cat_images, tmp_path):
    full = run_attack("lora", tiny, cat_images, CAT, {"steps": 4}, copy=True, defaults="toy", **QUICK)
    run_attack("lora", tiny, cat_images, CAT, {"steps": 2}, copy=True, defaults="toy", checkpoint_dir=tmp_path, checkpoint_every=2,
               **QUICK)
    resumed = run_attack("lora", tiny, cat_images, CAT, {"steps": 4}, copy=True, defaults="toy", checkpoint_dir=tmp_path,
                         checkpoint_every=2, **QUICK)
    assert resumed.resumed_from == 2 and resumed.losses == full.losses
    torch.testing.assert_close(_unet_out(resumed.pipe, CAT), _unet_out(full.pipe, CAT), rtol=0, atol=0)


def test_multi_concept_custom_diffusion(tiny):
    dogs = toy_data.toy_attack_data("spotted dog", "personalization", n=4, token="<new2>")[0]
    cats = toy_data.toy_attack_data("purple cat", "personalization", n=4)[0]
    pipe = copy_pipeline(tiny)
    settings = CustomDiffusionSettings.toy(modifier_token=("<new1>", "<new2>"), steps=2)
    r = custom_diffusion_multi_attack(pipe, [(cats, "a photo of <new1> cat"), (dogs, "a photo of <new2> dog")],
                                      settings, sample_steps=2, snapshot_steps=(2,), progress=False)
    assert r.tokens == ["<new1>", "<new2>"] and r.pipe is pipe
    assert r.snapshot_prompts == ["a photo of <new1> cat"] * 8 + ["a photo of <new2> dog"] * 8
    assert r.images_at(2).shape[0] == 16
    with pytest.raises(ValueError, match="2 concepts but 3 modifier tokens"):
        custom_diffusion_multi_attack(copy_pipeline(tiny), [(cats, "a photo of <new1> cat")] * 2,
                                      CustomDiffusionSettings.toy(modifier_token=("<a>", "<b>", "<c>")))


# ---- behaviour on the trained toy model: re-learning an erased concept -----------------------------------

N_EVAL = 16  # generated images per snapshot (seeds 0..15): the same seeds before and after every attack
SAMPLE_STEPS = 15
GUIDANCE = 7.5  # SD's default guidance scale
# Snapshot steps at which the re-learning tests read the oracle (each method's toy default step count last).
EVAL_STEPS = {"lora": (40, 60, 100), "custom_diffusion": (20, 30, 40), "textual_inversion": (160, 320, 640),
              "dreambooth": (40, 60)}


@pytest.fixture(autouse=True)
def _one_thread():
    """The measured numbers assume one thread (float reductions, hence trajectories, depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    """The trained toy model with 'cat' erased by UCE as the erasure stage erases it (the bare name toward "",
    keeping "" and every other base concept), and the oracle. Shared by the module: attacks work on copies."""
    from types import SimpleNamespace

    from mima_lib.experiment.config import ExperimentConfig
    from mima_lib.experiment.stages.erasure import uce_arguments
    from mima_lib.method.erase import erase_concepts
    from mima_lib.toy.model import load_toy_pipeline
    from mima_lib.toy.oracle import load_toy_oracle

    torch.set_num_threads(1)
    base = load_toy_pipeline()
    erased = copy_pipeline(base)
    erase_concepts(erased, **uce_arguments(ExperimentConfig(concepts=["cat"])))
    return SimpleNamespace(base=base, erased=erased, oracle=load_toy_oracle())


def _accuracy(world, pipe, prompt, concept):
    from mima_lib.method.diffusion import generate

    x = generate(pipe, [prompt] * N_EVAL, list(range(N_EVAL)), SAMPLE_STEPS, GUIDANCE)
    return world.oracle.accuracy(x, concept)


def test_erasure_leaves_cat_near_chance(world):
    assert _accuracy(world, world.base, CAT, "cat") >= 0.7  # measured 0.88 (0.79 at guidance 5)
    assert _accuracy(world, world.erased, CAT, "cat") <= 0.15  # measured 0.0; chance among 13 objects: 0.08
    assert _accuracy(world, world.erased, "a photo of a dog", "dog") >= 0.7  # other objects survive


RELEARN_PROMPTS = {"textual_inversion": toyworld.concept("cat").textual_inversion_prompt("<new1>")}  # 'a photo of a <new1>'


@pytest.mark.parametrize("method", ["lora", "custom_diffusion", "textual_inversion", "dreambooth"])
def test_relearning_restores_erased_concept(method, world):
    """Each attack, with its toy defaults, brings the erased 'cat' back on the non-immunized model.

    Success = the oracle finds cats in >= 60% of the snapshot images at one of the snapshot steps (the
    attacker keeps its best checkpoint; the paper likewise follows similarity over adaptation steps).
    On the toy model accuracy rises and falls between steps: the blurry generated cats sit near the
    oracle's cat/bird/flower boundaries, so one step alone would measure that boundary, not re-learning."""
    images, _ = toy_data.toy_attack_data("cat")  # 20 attacker renders, seeds 20_000..20_019
    prompt = RELEARN_PROMPTS.get(method, CAT)
    settings = make_settings(method, None, "toy")
    assert EVAL_STEPS[method][-1] == settings.steps
    result = run_attack(method, world.erased, images, prompt, settings, copy=True, defaults="toy", snapshot_steps=EVAL_STEPS[method],
                        snapshot_prompts=[prompt] * N_EVAL, snapshot_seeds=list(range(N_EVAL)),
                        sample_steps=SAMPLE_STEPS, guidance=GUIDANCE, progress=False)
    assert result.pipe is not world.erased and len(result.losses) == settings.steps
    acc = {s: world.oracle.accuracy(result.images_at(s), "cat") for s in EVAL_STEPS[method]}
    print(f"{method} (lr {settings.lr}, batch {settings.batch_size}): cat accuracy by step {acc}")
    assert max(acc.values()) >= 0.6, acc


def test_personalization_learns_a_new_instance(world):
    """Personalization: 'purple cat' is new to the model; LoRA learns it as 'a photo of <new1> cat'. The best
    snapshot counts, as in the re-learning tests: on v4 the LoRA peaks early and then drifts (measured 0.94 /
    0.88 / 0.25 at steps 50 / 100 / 150, the later images purple cats with the yellow stripes read as bird;
    v2: 0.6 or more at step 150)."""
    images, prompt = toy_data.toy_attack_data("purple cat", "personalization")
    assert prompt == "a photo of <new1> cat"
    assert _accuracy(world, world.base, prompt, "purple cat") <= 0.15  # measured 0.0: plain cats
    steps = (50, 100, 150)
    result = run_attack("lora", world.base, images, prompt, {"steps": steps[-1]}, copy=True, defaults="toy",
                        snapshot_steps=steps, snapshot_prompts=[prompt] * N_EVAL, snapshot_seeds=list(range(N_EVAL)),
                        sample_steps=SAMPLE_STEPS, guidance=GUIDANCE, progress=False)
    acc = {s: world.oracle.accuracy(result.images_at(s), "purple cat") for s in steps}
    print(f"lora personalization: purple cat accuracy by step {acc}")
    assert max(acc.values()) >= 0.6, acc


def test_dreambooth_keeps_the_unconditional_branch_and_relearns_an_erased_artist(world):
    """Full-UNet DreamBooth on 'an artwork of van gogh' alone also teaches the unconditional branch the style,
    and classifier-free guidance then subtracts it: measured on van gogh erased with five other concepts,
    0.06 at guidance 5 against 0.31 at guidance 1 (step 60, scripts/attack_probe.py). The toy default's prior
    on the unconditional prompt "" keeps that branch, and the erased artist comes back: measured 0.94 at step
    60 (guidance 5).
    Bounds: >= 0.6 with the prior (the best of steps 40 and 60); without it, at least 0.25 lower."""
    from mima_lib.experiment.config import ExperimentConfig
    from mima_lib.experiment.stages.erasure import uce_arguments
    from mima_lib.method.erase import erase_concepts

    erased = copy_pipeline(world.base)
    erase_concepts(erased, **uce_arguments(ExperimentConfig(concepts=["van gogh"])))
    prompt = toyworld.concept("van gogh").prompt
    assert _accuracy(world, erased, prompt, "van gogh") <= 0.15
    images, _ = toy_data.toy_attack_data("van gogh")
    acc = {}
    for prior in (True, False):
        settings = make_settings("dreambooth", {"prior_preservation": prior}, "toy")
        assert settings.class_prompt == ""  # the toy default: the unconditional prompt
        r = run_attack("dreambooth", erased, images, prompt, settings, copy=True, defaults="toy",
                       snapshot_steps=(40, 60), snapshot_prompts=[prompt] * N_EVAL, snapshot_seeds=list(range(N_EVAL)),
                       sample_steps=SAMPLE_STEPS, guidance=5.0, progress=False)
        acc[prior] = max(world.oracle.accuracy(r.images_at(s), "van gogh") for s in (40, 60))
    print(f"dreambooth on erased van gogh, best of steps 40/60, with / without the unconditional prior: {acc}")
    assert acc[True] >= 0.6, acc
    assert acc[True] - acc[False] >= 0.25, acc
