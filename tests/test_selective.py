"""Selective immunization (method/selective.py): the projected K/V change leaves every row outside the
targets' own span untouched, exactly; on random matrices and on the SD-shaped pipeline's real text states."""
import pytest
import torch

from mima_lib.method.problem import ImmunizeConfig
from mima_lib.method.selective import owned_positions, owned_row_projector, project_update


def test_owned_positions_skip_every_shared_prefix():
    assert owned_positions([0, 5, 6, 7, 9, 1], [[0, 5, 6, 7, 8, 1], [0, 1, 2]]) == 4
    assert owned_positions([0, 9, 1], [[0, 1, 2]]) == 1  # BOS is never owned
    assert owned_positions([0, 9, 1], []) == 1


def test_projector_is_orthogonal_to_shared_rows_and_keeps_owned_ones():
    g = torch.Generator().manual_seed(0)
    D = 32
    shared = torch.randn(5, D, generator=g)
    owned = torch.randn(6, D, generator=g) + shared[:1]  # partly inside the shared span
    P = owned_row_projector(owned, shared)
    torch.testing.assert_close(P @ P, P, atol=1e-5, rtol=0)  # a projector
    torch.testing.assert_close(P, P.T, atol=1e-6, rtol=0)
    assert round(float(torch.trace(P))) == 6
    assert float((shared.double() @ P).abs().max()) < 1e-8  # the shared rows are outside the span
    resid = owned.double() - owned.double() @ P  # what is left of an owned row lies in the shared span
    S = torch.linalg.qr(shared.double().T).Q
    torch.testing.assert_close(resid, resid @ S @ S.T, atol=1e-8, rtol=0)


def test_projected_update_leaves_other_rows_drawn_as_before():
    g = torch.Generator().manual_seed(1)
    D, out = 24, 16
    shared, owned = torch.randn(4, D, generator=g), torch.randn(3, D, generator=g)
    P = owned_row_projector(owned, shared).float()
    W0 = torch.randn(out, D, generator=g)
    W = W0 + torch.randn(out, D, generator=g)  # an unconstrained update
    project_update(W, W0, P)
    torch.testing.assert_close(W @ shared.T, W0 @ shared.T, atol=1e-4, rtol=0)
    assert float((W - W0).norm()) > 0.1  # and the owned rows do change
    other = torch.randn(D, generator=g)
    other = other - P @ other
    torch.testing.assert_close(W @ other, W0 @ other, atol=1e-4, rtol=0)


def test_bad_outer_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="outer_rows"):
        ImmunizeConfig(outer_rows="some").validate()
    with pytest.raises(ValueError, match="autograd"):
        ImmunizeConfig(outer_rows="targets", hypergrad="hvp").validate()


def test_selective_immunization_keeps_the_empty_prompt_exact(toy_pipe_factory):
    """A real immunize() run on the toy: with outer_rows='targets' the K/V outputs of the empty prompt (the
    unconditional branch) and of a kept prompt's shared prefix do not move, while the targets' do."""
    from mima_lib.method.immunize import immunize
    from mima_lib.method.text_tokens import encode_prompt_tokens
    from mima_lib.toy import world

    pipe = toy_pipe_factory()
    target, kept = world.concept("cat").prompt, world.concept("dog").prompt
    kv = {n: m.weight for n, m in pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    before = {n: w.detach().clone() for n, w in kv.items()}
    cfg = ImmunizeConfig.toy(steps=2, outer_rows="targets", diagnose_every=0)
    immunize(pipe, {target: world.render_many("cat", 2)}, {kept: world.render_many("dog", 2)}, cfg=cfg,
             progress=False)
    with torch.no_grad():
        empty = encode_prompt_tokens(pipe, [""], include_padding=True)[0]
        cat = encode_prompt_tokens(pipe, [target], include_padding=True)[0]
        kv = {n: w.detach() for n, w in kv.items()}
    moved = max(float((kv[n] @ cat.T - before[n] @ cat.T).abs().max()) for n in kv)
    still = max(float((kv[n] @ empty.T - before[n] @ empty.T).abs().max()) for n in kv)
    prefix = max(float((kv[n] @ cat[:5].T - before[n] @ cat[:5].T).abs().max()) for n in kv)  # BOS a photo of a
    assert moved > 1e-3, moved
    assert still <= 1e-3 * moved, (still, moved)
    assert prefix <= 1e-3 * moved, (prefix, moved)


def test_protect_prompts_need_the_selective_update():
    with pytest.raises(ValueError, match="outer_rows: targets"):
        ImmunizeConfig(protect_prompts=["a photo of a cat"]).validate()


def test_personalization_protects_the_instance_and_leaves_its_class_exact(toy_pipe_factory):
    """Immunizing "a photo of <new1> cat" with its class protected: the K/V outputs of every row of "a photo of
    a cat" stay as they were, while the instance's rows move. Without protection the class's rows move by more
    than a tenth of the instance's (the toy encoder's "cat" row hardly depends on what precedes it)."""
    from mima_lib.method.immunize import immunize
    from mima_lib.method.text_tokens import encode_prompt_tokens
    from mima_lib.toy import world

    inst, cls = world.concept("purple cat").personalization_prompt("<new1>"), world.concept("cat").prompt
    moves = {}
    for protect in ([], [cls]):
        pipe = toy_pipe_factory()
        kv = {n: m.weight for n, m in pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}
        before = {n: w.detach().clone() for n, w in kv.items()}
        cfg = ImmunizeConfig.toy(steps=2, diagnose_every=0, protect_prompts=protect)
        immunize(pipe, {inst: world.render_many("purple cat", 2)},
                 {world.concept("tree").prompt: world.render_many("tree", 2)}, cfg=cfg, progress=False)
        with torch.no_grad():
            rows = {p: encode_prompt_tokens(pipe, [p], include_padding=True)[0]
                    for p in (cls, inst)}
        moves[bool(protect)] = {p: max(float((kv[n].detach() @ r.T - before[n] @ r.T).abs().max()) for n in kv)
                                for p, r in rows.items()}
    assert moves[True][inst] > 1e-3, moves
    assert moves[True][cls] <= 1e-3 * moves[True][inst], moves
    assert moves[False][cls] > 0.1 * moves[False][inst], moves  # what the protection prevents
