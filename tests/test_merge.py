"""Tests of mima_lib.merge: Custom Diffusion's closed-form multi-concept merge."""

import pytest
import torch

from mima_lib.method.merge import (
    is_cross_attention_kv,
    merge_cross_attention,
    merge_mean,
    merge_projection,
    unique_rows,
)

torch.set_num_threads(1)

F64 = torch.float64


def _problem(d_out=6, d_in=10, r=3, m=25, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    C = torch.randn(r, d_in, generator=g, dtype=dtype)
    V = torch.randn(r, d_out, generator=g, dtype=dtype)
    C_reg = torch.randn(m, d_in, generator=g, dtype=dtype)
    return W0, C, V, C_reg


def _objective(W, W0, C_reg):
    return ((W - W0) @ C_reg.T).pow(2).sum()


def test_constraint_holds():
    W0, C, V, C_reg = _problem()
    W = merge_projection(W0, C, V, C_reg)
    rel = (W @ C.T - V.T).norm() / V.norm()
    assert rel < 1e-4
    assert W.dtype == F64 and W.shape == W0.shape


@pytest.mark.parametrize("m", [25, 4])  # full-rank and rank-deficient regularizer (ridge needed)
def test_merged_is_optimal_among_feasible(m):
    W0, C, V, C_reg = _problem(m=m)
    W = merge_projection(W0, C, V, C_reg, ridge=1e-8)
    best = _objective(W, W0, C_reg)
    # Every other feasible weight is W + Delta with Delta C^T = 0: project random Z off the row space of C.
    P = torch.eye(C.shape[1], dtype=F64) - C.T @ torch.linalg.solve(C @ C.T, C)
    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1e-1, 1.0, 10.0):
        Delta = scale * torch.randn(W.shape, generator=g, dtype=F64) @ P
        assert (Delta @ C.T).abs().max() < 1e-9
        assert _objective(W + Delta, W0, C_reg) >= best - 1e-9 * (1 + best)


def test_gradcheck_w0_v_c():
    W0, C, V, C_reg = _problem(d_out=3, d_in=5, r=2, m=7)
    inputs = tuple(t.clone().requires_grad_(True) for t in (W0, V, C))

    def f(W0_, V_, C_):
        return merge_projection(W0_, C_, V_, C_reg)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_single_concept_reproduces_adapted_outputs():
    W0, C1, _, C_reg = _problem(r=4)
    W1 = W0 + 0.1 * torch.randn(W0.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    W = merge_cross_attention({name: W0}, [{name: W1}], [C1], C_reg)[name]
    torch.testing.assert_close(W @ C1.T, W1 @ C1.T, rtol=1e-8, atol=1e-8)
    # and it is not simply W1: the regularizer pulls the rest back toward W0
    assert _objective(W, W0, C_reg) < _objective(W1, W0, C_reg)


def test_unique_rows_stable_with_tolerance():
    g = torch.Generator().manual_seed(3)
    a, b, c = torch.randn(3, 8, generator=g)
    C = torch.stack([a, b, a + 1e-7, c, b, a])
    assert unique_rows(C).tolist() == [0, 1, 3]
    assert unique_rows(C, atol=0, rtol=0).tolist() == [0, 1, 2, 3]


def test_duplicate_rows_shared_prefix():
    # Two concepts share a prompt prefix: identical first two token rows (causal text encoder).
    W0, _, _, C_reg = _problem(d_in=12, m=30)
    g = torch.Generator().manual_seed(4)
    prefix = torch.randn(2, 12, generator=g, dtype=F64)
    C1 = torch.cat([prefix, torch.randn(2, 12, generator=g, dtype=F64)])
    C2 = torch.cat([prefix, torch.randn(3, 12, generator=g, dtype=F64)])
    W1 = W0 + 0.1 * torch.randn(W0.shape, generator=g, dtype=F64)
    W2 = W0 + 0.1 * torch.randn(W0.shape, generator=g, dtype=F64)
    name = "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v.weight"
    W = merge_cross_attention({name: W0}, [{name: W1}, {name: W2}], [C1, C2], C_reg)[name]
    assert torch.isfinite(W).all()
    torch.testing.assert_close(W @ C1.T, W1 @ C1.T, rtol=1e-7, atol=1e-7)  # first concept owns the prefix
    torch.testing.assert_close(W @ C2[2:].T, W2 @ C2[2:].T, rtol=1e-7, atol=1e-7)
    # Without de-duplication the projection itself refuses (conflicting equal rows), rather than NaN.
    C = torch.cat([C1, C2])
    V = torch.cat([C1 @ W1.T, C2 @ W2.T])
    with pytest.raises(ValueError, match="unique_rows"):
        merge_projection(W0, C, V, C_reg)


def test_overdetermined_raises_clear_error():
    W0, C, V, C_reg = _problem(d_in=5, r=7)
    with pytest.raises(ValueError, match="fewer target"):
        merge_projection(W0, C, V, C_reg)
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(ValueError, match="d_in = 5"):
        merge_cross_attention({name: W0}, [{name: W0}], [C], C_reg)
    # rank-deficient but r <= d_in: caught by the conditioning check
    C_bad = torch.cat([C[:2], C[:1] + C[1:2]])
    with pytest.raises(ValueError, match="ill-conditioned"):
        merge_projection(W0, C_bad, V[:3], C_reg)
    # the soft-constraint option gives a finite least-squares compromise instead
    W = merge_projection(W0, C, V, C_reg, constraint_ridge=1e-6)
    assert torch.isfinite(W).all()


def test_float32_with_float64_compute():
    W0, C, V, C_reg = _problem(d_out=8, d_in=16, r=5, m=40)
    ref = merge_projection(W0, C, V, C_reg)
    out = merge_projection(W0.float(), C.float(), V.float(), C_reg.float(), dtype=F64)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_merge_mean_and_name_filter():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor(3.0)}
    b = {"x": torch.tensor([3.0, 4.0]), "y": torch.tensor(5.0)}
    out = merge_mean([a, b])
    torch.testing.assert_close(out["x"], torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(out["y"], torch.tensor(4.0))
    with pytest.raises(KeyError):
        merge_mean([a, {"x": a["x"]}])
    assert is_cross_attention_kv("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    assert is_cross_attention_kv("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight")
    assert not is_cross_attention_kv("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight")
    assert not is_cross_attention_kv("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight")
    assert not is_cross_attention_kv("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.bias")
