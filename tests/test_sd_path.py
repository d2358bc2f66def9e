"""The Stable Diffusion v1-4 path on a model with SD's shape (issue #13): the real CLIP tokenizer, 77 tokens,
768-d text states, SD's block layout (mima_lib.testing.sd_shaped; fixture `sd_shaped` in conftest.py).

What could silently falsify results on SD is measured here: how far the simulated attack moves the weights,
that the exact hypergradient still matches finite differences, that UCE leaves the template and other prompts
alone, that the merge ignores BOS, and that the parameter file (not the image size) picks the defaults."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from mima_lib.experiment.config import attack_defaults, merge_captions
from mima_lib.experiment.loading import load_experiment
from mima_lib.experiment.dataclass_yaml import ConfigError
from mima_lib.method.bilevel import plain_attention
from mima_lib.method.captions import GENERIC_CAPTIONS, captions_naming, generic_captions
from mima_lib.method.erase import erase_concepts
from mima_lib.method.immunize import ImmunizeConfig, bilevel_loss
from mima_lib.method.pipeline import load_pipeline
from mima_lib.method.problem import prepare
from mima_lib.method.text_tokens import encode_prompt_tokens
from mima_lib.toy import world

PARAMS = Path(__file__).resolve().parent.parent / "papermill_params"
ARTISTS = ["an artwork of Kelly McKernan", "an artwork of Van Gogh"]


@pytest.fixture
def sd_pipe(sd_shaped):
    return load_pipeline(sd_shaped["model"])


def _concept_images(n: int = 2) -> dict:
    return {p: world.render_many(name, n, 60_000, size=64) for p, name in zip(ARTISTS, ["kelly mckernan", "van gogh"])}


def _problem(pipe, **kw):
    cfg = ImmunizeConfig(**{**dict(steps=1, inner_params="unet", outer_params="xattn", prior_weight=0.0,
                                   diagnose_every=1, seed=0), **kw})
    prob = prepare(pipe, _concept_images(), None, None, cfg, reg_captions=generic_captions(["van gogh"])[:50])
    pipe.unet.requires_grad_(False)
    for k in prob.outer_names:
        prob.params[k].requires_grad_(True)
    return prob


def test_the_tokenizer_is_sd14s(sd_pipe):
    tok = sd_pipe.tokenizer
    assert tok.model_max_length == 77 and tok.pad_token_id == tok.eos_token_id == 49407
    assert tok("a photo of").input_ids == [49406, 320, 1125, 539, 49407]
    assert len(tok("Kelly McKernan", add_special_tokens=False).input_ids) == 3
    assert len(tok("<new1>", add_special_tokens=False).input_ids) == 4  # plain text until an attack adds it
    assert len(tok("sks", add_special_tokens=False).input_ids) == 1  # Custom Diffusion's initializer word


def test_the_adam_scaled_inner_step_moves_the_weights_at_the_attackers_scale(sd_pipe):
    """Adam's first step moves every tensor by lr per element (RMS): ||theta' - theta|| = lr sqrt(n). A plain
    SGD step of the reference's 1e-5 moves SD-shaped weights by far less: theta* = theta, no second order."""
    prob = _problem(sd_pipe)  # the paper's inner_lr 1e-5, inner_scaling 'adam', S_l = the whole UNet
    with plain_attention(sd_pipe.unet):
        _, adam = bilevel_loss(prob, 0, torch.Generator().manual_seed(0))
    n = sum(prob.params[k].numel() for k in prob.inner_names)
    norm = float(torch.sqrt(sum(prob.params[k].detach().double().pow(2).sum() for k in prob.inner_names)))
    # a few tensors get no gradient from the loss (and do not move): within 1%
    assert adam["inner_move"] == pytest.approx(1e-5 * n ** 0.5 / norm, rel=1e-2)
    prob.cfg = replace(prob.cfg, inner_scaling="sgd")
    with plain_attention(sd_pipe.unet):
        _, sgd = bilevel_loss(prob, 0, torch.Generator().manual_seed(0))
    print(f"relative move: adam {adam['inner_move']:.3g}, sgd {sgd['inner_move']:.3g}; merged "
          f"{adam['merged_move']:.3g}; cos(order 1, order 2) {adam['hypergrad_cos']:.3f}, second-order share "
          f"{adam['second_order_share']:.3f}")
    assert sgd["inner_move"] < adam["inner_move"] / 100
    assert 0 < adam["merged_move"] and 0 < adam["second_order_share"] < 2 and -1 <= adam["hypergrad_cos"] <= 1


def test_order_2_matches_finite_differences_on_the_sd_shaped_model(sd_pipe):
    """With the attacker's step sizes held (the constants the hypergradient treats as constants), the exact
    gradient agrees with central differences of the objective; the first-order one does not."""
    pipe = sd_pipe.to(torch.float64)
    grads, fd = {}, None
    for order in (2, 1):
        prob = _problem(pipe, order=order, inner_params="xattn", inner_lr=3e-3, diagnose_every=0,
                        merge_float64=True)
        prob.step_sizes = {}  # recorded at theta by the first evaluation, replayed by the shifted ones
        g = torch.Generator().manual_seed(0)
        v = {k: torch.randn(prob.params[k].shape, generator=g, dtype=torch.float64) for k in prob.outer_names}
        norm = torch.sqrt(sum(x.pow(2).sum() for x in v.values()))
        v = {k: x / norm for k, x in v.items()}
        J = lambda: bilevel_loss(prob, 0, torch.Generator().manual_seed(5))[0]  # noqa: E731 (fixed draws)
        with plain_attention(pipe.unet):
            J().backward()
            grads[order] = float(sum((prob.params[k].grad * v[k]).sum() for k in prob.outer_names))
            if order == 2:
                eps = 1e-5
                with torch.no_grad():
                    for k in v:
                        prob.params[k].add_(eps * v[k])
                plus = float(J().detach())
                with torch.no_grad():
                    for k in v:
                        prob.params[k].add_(-2 * eps * v[k])
                minus = float(J().detach())
                with torch.no_grad():
                    for k in v:
                        prob.params[k].add_(eps * v[k])
                fd = (plus - minus) / (2 * eps)
    rel2, rel1 = abs(grads[2] - fd) / abs(fd), abs(grads[1] - fd) / abs(fd)
    print(f"directional derivative: exact {grads[2]:.6g}, first order {grads[1]:.6g}, central difference {fd:.6g}")
    assert rel2 < 1e-3, rel2
    assert rel1 > 10 * rel2, (rel1, rel2)


def test_the_merge_constrains_no_bos_row(sd_pipe):
    prob = _problem(sd_pipe)
    full = encode_prompt_tokens(sd_pipe, ARTISTS)
    for rows, f in zip(prob.token_rows, full):
        torch.testing.assert_close(rows, f[1:])  # content tokens and EOS, as in the reference code


def _kv(pipe, prompt: str) -> torch.Tensor:
    """Every attn2 K/V output of the prompt's 77 rows, stacked: what cross-attention sees."""
    states = encode_prompt_tokens(pipe, [prompt], include_padding=True)[0]
    outs = [m.weight @ states.T for n, m in pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    return torch.cat(outs)


def test_uce_erases_the_bare_name_not_the_template(sd_shaped):
    """The reference erases 'van gogh' itself, its tokens, EOS and the padding (no row of 'an artwork of'),
    toward the aligned rows of "", keeping "". Every K/V output still moves a little: the random encoder's rows share one
    direction (mean cosine 0.86 between rows of different prompts), so no edit leaves them exactly alone. But
    the template and a non-target prompt move much less than when the templated prompt is erased (the old
    scheme; measured 34% vs 78% and 13% vs 20%)."""
    from mima_lib.method.erase import reference_rows

    pipe = load_pipeline(sd_shaped["model"])
    with torch.no_grad():
        bare = encode_prompt_tokens(pipe, ["van gogh"], include_padding=True)[0]
        guide = encode_prompt_tokens(pipe, [""], include_padding=True)[0]
        erased, target = reference_rows(bare, guide, 3, 1)  # EOS at 3 ([BOS, van, gogh, EOS]) and at 1 for ""
    torch.testing.assert_close(erased, bare[1:])  # 'van', 'gogh', EOS and the padding
    torch.testing.assert_close(target[:2], guide[:1].expand(2, -1))  # both name tokens -> BOS of ""
    torch.testing.assert_close(target[2:], guide[1:75])  # EOS -> EOS, padding -> padding
    changes = {}
    for positions, erase in (("reference", "van gogh"), ("all", "an artwork of van gogh")):
        pipe = load_pipeline(sd_shaped["model"])
        with torch.no_grad():
            before = {p: _kv(pipe, p) for p in ("an artwork of van gogh", "a photo of teapot")}
            erase_concepts(pipe, [erase], "", ["", "claude monet", "pablo picasso"], lam=0.5,
                           token_positions=positions)
            after = {p: _kv(pipe, p) for p in before}
        rel = {p: float((after[p] - before[p]).norm() / before[p].norm()) for p in before}
        a, b = after["an artwork of van gogh"][:, :4], before["an artwork of van gogh"][:, :4]
        changes[positions] = dict(rel, template=float((a - b).norm() / b.norm()))
    ref, old = changes["reference"], changes["all"]
    print(f"relative change of K/V outputs: reference {ref}, templated {old}")
    assert ref["template"] < 0.6 * old["template"]
    assert ref["a photo of teapot"] < 0.8 * old["a photo of teapot"]


def test_generic_captions_never_name_a_target_and_the_file_is_checked(tmp_path):
    assert len(GENERIC_CAPTIONS) >= 200 and len(set(GENERIC_CAPTIONS)) == len(GENERIC_CAPTIONS)
    assert captions_naming(GENERIC_CAPTIONS, ["apple"]) == ["a basket of apples in an orchard"]  # plurals too
    assert not captions_naming(generic_captions(["apple", "cat", "dog"]), ["apple", "cat", "dog"])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"concepts": ["cat"], "data": {"merge_captions": ["a cat on a sofa", "a tree"]}}))
    with pytest.raises(ConfigError, match="1 caption.*name a target.*'a cat on a sofa'"):
        load_experiment(path)
    (tmp_path / "caps.txt").write_text("a tree\na dog on a beach\n")
    path.write_text(yaml.safe_dump({"concepts": ["cat"], "data": {"merge_captions": "caps.txt"}}))
    assert merge_captions(load_experiment(path)) == ["a tree", "a dog on a beach"]  # relative to the file
    assert not captions_naming(merge_captions(cfg := load_experiment(PARAMS / "default.yaml")), cfg.concepts)


def test_relative_paths_are_read_against_the_parameter_file(tmp_path, monkeypatch):
    folder = tmp_path / "exp"
    (folder / "imgs" / "cat").mkdir(parents=True)
    (folder / "p.yaml").write_text(yaml.safe_dump({"concepts": ["cat"], "data": {"image_root": "imgs"}}))
    monkeypatch.chdir(tmp_path)  # the notebooks run in notebooks/, the command line anywhere
    cfg = load_experiment(folder / "p.yaml")
    assert Path(cfg.data.image_root) == (folder / "imgs").resolve()
    (folder / "q.yaml").write_text(yaml.safe_dump({"concepts": ["cat"], "data": {"image_root": "missing"}}))
    with pytest.raises(ConfigError, match=f"folder {folder / 'missing'} does not exist"):
        load_experiment(folder / "q.yaml")


def test_the_parameter_file_not_the_image_size_picks_the_defaults(sd_shaped):
    """The SD-shaped model makes 64 px images, which the old size rule took for the toy."""
    ev = sd_shaped["evaluators"]
    sets = [f"model={sd_shaped['model']}", "device=cpu", "evaluate.extractors=[clip, dino]",
            f"evaluate.models={{clip: {ev['clip']}, dino: {ev['dino']}}}", "data.sample_steps=2"]
    cfg = load_experiment(PARAMS / "sd14_relearn_artists.yaml", sets)
    assert attack_defaults(cfg) == "paper" and attack_defaults(load_experiment(PARAMS / "default.yaml")) == "toy"
    from mima_lib.experiment.stages.attack import attack_settings, sampling

    assert sampling(load_experiment(PARAMS / "sd14_relearn_artists.yaml", sets[:4])) == \
        {"sample_steps": 50, "guidance": 7.5}  # the snapshots sample as the file says (the paper's 50 / 7.5)
    pers = load_experiment(PARAMS / "sd14_personalization.yaml", sets + [f"data.image_root={sd_shaped['model']}",
                                                                         "concepts=[unet]",
                                                                         "definitions.unet={kind: instance, "
                                                                         "prompt: a photo of <new1> unet}"])
    assert attack_settings(pers, "custom_diffusion", 0)["modifier_token"] == "<new1>"


@pytest.mark.parametrize("sets, match", [
    (["attack.settings.lora.stepz=3"], "unknown lora settings \\['stepz'\\]"),
    (["attack.seeds=three"], "attack.seeds: expected a list"),
    (["nonsense"], "write KEY.PATH=VALUE"),
    (["concepts.cat=1"], "concepts is \\['cat', 'van gogh'\\], not a mapping"),
])
def test_command_line_overrides_are_validated_like_the_file(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_experiment(PARAMS / "default.yaml", sets)


def test_grids_of_large_images_stay_small():
    from mima_lib.evaluation.plots import image_grid

    big = [im.resize((512, 512)) for im in world.render_many("cat", 4, 0)]
    assert image_grid(big, 2, 2).size == (192, 192)  # 96 px cells, not 1536
    assert image_grid(world.render_many("cat", 4, 0), 2, 2).size == (192, 192)  # the toy's 32 px, scaled 3x
