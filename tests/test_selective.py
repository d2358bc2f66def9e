"""Selective immunization (method/selective.py): the projected K/V change leaves every row outside the
targets' own span untouched, exactly; on random matrices and on the SD-shaped pipeline's real text states."""
import pytest
import torch

from mima_lib.method.problem import ImmunizeConfig
from mima_lib.method.selective import (contrast_basis, limit_change, owned_positions, owned_row_projector,
                                      project_update, relative_change)


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


def _rows_with_a_common_part(g, n_concepts, rows_each, common, D):
    """Each concept's rows: its own direction plus a mix of the ``common`` directions every prompt carries."""
    return [torch.randn(1, D, generator=g) + torch.randn(rows_each, common.shape[0], generator=g) @ common
            for _ in range(n_concepts)]


def test_contrast_drops_what_every_prompt_carries_and_keeps_what_the_targets_own():
    """Targets, prior and held-out concepts share a few common directions. Without contrast the projector
    spans them, so a held-out concept's rows leak into it; with contrast only the targets' own directions
    stay, and the held-out leak falls below a tenth of it, while most of the targets' energy stays."""
    g = torch.Generator().manual_seed(2)
    D = 64
    common = 3 * torch.randn(4, D, generator=g)
    targets, prior, held_out = (torch.cat(_rows_with_a_common_part(g, n, 8, common, D)) for n in (3, 10, 5))
    share = lambda P, rows: float((rows.double() @ P).norm() ** 2 / rows.double().norm() ** 2)  # noqa: E731
    empty = torch.zeros(0, D)
    plain = owned_row_projector(targets, empty)
    narrowed = owned_row_projector(targets, empty, kept=prior, contrast=10.0)
    U = contrast_basis(targets, prior, 10.0)
    torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype), atol=1e-8, rtol=0)
    assert U.shape[1] == 3, U.shape  # one own direction per target
    assert share(plain, held_out) > 0.5
    assert share(narrowed, held_out) < 0.1 * share(plain, held_out), (share(narrowed, held_out), share(plain, held_out))
    assert share(narrowed, targets) > 0.02  # the targets' own directions are a small part of their energy here
    own = targets - targets @ torch.linalg.pinv(common) @ common  # the part outside the common directions
    assert share(narrowed, own) > 0.8  # (whitening by the prior tilts the directions a little)
    assert contrast_basis(targets, prior, 1e9).shape[1] == 0  # nothing passes an absurd contrast


def test_rtol_drops_a_targets_weak_direction_that_is_another_concepts_main_one():
    """A concept's rows are nearly rank one: name, EOS and padding differ only by small deviations. With a tiny
    rtol the span keeps those weak directions in full, and a concept whose main direction lies along one of
    them is inside the span although the targets' rows hardly carry it; row_rtol=0.1 leaves it out."""
    g = torch.Generator().manual_seed(4)
    D = 48
    q = torch.linalg.qr(torch.randn(D, 8, generator=g)).Q.T  # orthonormal directions
    # two targets: 6 rows each along their own direction, with a 3% deviation along q[2] / q[3]
    targets = torch.cat([q[i] + 0.03 * torch.randn(6, 1, generator=g) * q[2 + i] for i in range(2)])
    other = q[2] + 0.1 * q[5]  # an untargeted concept's main direction: one target's weak one
    share = lambda P: float((other.double() @ P).norm() / other.double().norm())  # noqa: E731
    empty = torch.zeros(0, D)
    wide, narrow = owned_row_projector(targets, empty, rtol=1e-3), owned_row_projector(targets, empty, rtol=0.1)
    assert round(float(torch.trace(wide))) == 4 and round(float(torch.trace(narrow))) == 2
    assert share(wide) > 0.95 and share(narrow) < 0.05, (share(wide), share(narrow))
    kept = float((targets.double() @ narrow).norm() / targets.double().norm())
    assert kept > 0.99  # and the targets' own rows keep nearly all their norm in the narrowed span
    with pytest.raises(ValueError, match="row_rtol"):
        ImmunizeConfig(row_rtol=1.0).validate()


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


def test_limit_change_caps_the_targets_change_and_keeps_its_direction():
    g = torch.Generator().manual_seed(3)
    rows, W0 = torch.randn(7, 16, generator=g), torch.randn(12, 16, generator=g)
    dW = 5 * torch.randn(12, 16, generator=g)
    W = W0 + dW
    before = limit_change(W, W0, rows, 0.5)
    assert before == pytest.approx(float((rows @ dW.T).norm() / (rows @ W0.T).norm()), rel=1e-5) and before > 0.5
    assert relative_change(W, W0, rows) == pytest.approx(0.5, rel=1e-5)
    torch.testing.assert_close(W - W0, dW * (0.5 / before), atol=1e-5, rtol=0)  # scaled, not turned
    W2 = W.clone()
    assert limit_change(W2, W0, rows, 1.0) == pytest.approx(0.5, rel=1e-5)
    torch.testing.assert_close(W2, W)  # within the budget: untouched


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


def test_kv_budget_holds_in_a_real_run_and_is_logged(toy_pipe_factory):
    """With kv_budget, no layer's K/V outputs on the targets' rows move by more than the budget, and the
    result logs the change each step asked for (which the budget then scaled back)."""
    from mima_lib.method.immunize import immunize
    from mima_lib.method.text_tokens import encode_prompt_tokens
    from mima_lib.toy import world

    with pytest.raises(ValueError, match="kv_budget"):
        ImmunizeConfig(kv_budget=1.0).validate()  # needs outer_rows: targets
    with pytest.raises(ValueError, match="kv_budget"):
        ImmunizeConfig.toy(kv_budget=0.0).validate()
    pipe = toy_pipe_factory()
    target = world.concept("cat").prompt
    kv = {n: m.weight for n, m in pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    before = {n: w.detach().clone() for n, w in kv.items()}
    cfg = ImmunizeConfig.toy(steps=3, kv_budget=0.02, diagnose_every=0)
    res = immunize(pipe, {target: world.render_many("cat", 2)}, {world.concept("dog").prompt:
                   world.render_many("dog", 2)}, cfg=cfg, progress=False)
    rows = encode_prompt_tokens(pipe, [target], include_padding=True)[0].detach()
    changes = [relative_change(kv[n].detach(), before[n], rows) for n in kv]
    assert max(changes) <= 0.02 * 1.001, changes
    assert max(changes) > 0.019  # the ascent reaches the budget
    assert len(res.target_kv_change) == 3 and res.target_kv_change[-1] > 0.02  # it asked for more


def test_protect_prompts_need_the_selective_update():
    with pytest.raises(ValueError, match="outer_rows: targets"):
        ImmunizeConfig(protect_prompts=["a photo of a cat"]).validate()
    with pytest.raises(ValueError, match="contrast_prompts.*row_contrast > 0"):  # no contrast: they would do nothing
        ImmunizeConfig.toy(contrast_prompts=["a photo of a cup"]).validate()
    ImmunizeConfig.toy(contrast_prompts=["a photo of a cup"], row_contrast=1.0).validate()


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
