"""Custom Diffusion's closed-form multi-concept merge (Kumari et al. 2023), as used by MIMA.

For one cross-attention key/value projection with current weight ``W0`` (d_out x d_in) solve

    min_W ||(W - W0) C_reg^T||_F^2   subject to   W C^T = V^T

where ``C`` (r x d_in) stacks the target-token embeddings of all concepts, ``V`` (r x d_out) the outputs
the adapted layers give on them, and ``C_reg`` (m x d_in) the embeddings of regularization captions.
With ``M = C_reg^T C_reg`` and ``d = C M^{-1}`` the solution is

    W = W0 + (V^T - W0 C^T) (d C^T)^{-1} d.

Everything is solves and Cholesky factorizations (no explicit inverse), so the result is differentiable in
W0, V and C: MIMA's upper-level gradient flows through it. ``d`` and ``d C^T`` depend only on the text
embeddings, so :func:`merge_cross_attention` factorizes them once and reuses them for every layer.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

__all__ = [
    "is_cross_attention_kv",
    "unique_rows",
    "merge_projection",
    "merge_cross_attention",
    "merge_mean",
]

_KV_RE = re.compile(r"(^|\.)attn2\.to_[kv]\.weight$")


def is_cross_attention_kv(name: str) -> bool:
    """True for diffusers UNet cross-attention key/value weights, e.g. ``...attn2.to_k.weight``."""
    return bool(_KV_RE.search(name))


def unique_rows(C: Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> Tensor:
    """Indices (ascending, so stable order) of the first occurrence of each distinct row of ``C``.

    Row i duplicates an earlier kept row j when ``max|C_i - C_j| <= atol + rtol * max|C_j|``. A tolerance
    rather than exact equality because a causal text encoder gives the same prefix ("a photo of a") the same
    embedding only up to batch-dependent rounding.
    """
    if C.dim() != 2:
        raise ValueError(f"unique_rows expects a 2-D tensor, got shape {tuple(C.shape)}")
    C = C.detach()
    dist = torch.cdist(C.unsqueeze(0), C.unsqueeze(0), p=float("inf"))[0]  # max-abs difference, r x r
    tol = atol + rtol * C.abs().amax(dim=1)  # tolerance of the earlier (column) row
    dup = dist <= tol.unsqueeze(0)
    keep = torch.zeros(C.shape[0], dtype=torch.bool, device=C.device)
    for i in range(C.shape[0]):
        keep[i] = not bool((dup[i, :i] & keep[:i]).any())
    return keep.nonzero().flatten()


def _compute_dtype(dtype, *tensors: Tensor) -> torch.dtype:
    if dtype is not None:
        return dtype
    # Half precision is too coarse for these solves: compute at least in float32.
    out = torch.float32
    for t in tensors:
        out = torch.promote_types(out, t.dtype)
    return out


def _merge_system(C: Tensor, C_reg: Tensor, ridge: float, constraint_ridge: float, rcond: float | None):
    """Factors shared by every layer: ``d = C M^{-1}`` and the Cholesky factor of ``S = d C^T``."""
    r, d_in = C.shape
    if C_reg.dim() != 2 or C_reg.shape[1] != d_in:
        raise ValueError(f"C_reg must be (m x {d_in}), got {tuple(C_reg.shape)}")
    eye = torch.eye(d_in, dtype=C.dtype, device=C.device)
    if C_reg.shape[0] == 0:
        M = eye  # no regularizer: the minimum-norm change ||W - W0||_F
    else:
        M = C_reg.T @ C_reg
        # Ridge relative to the mean diagonal, so it means the same for any embedding scale; it makes M
        # positive definite when the captions span fewer than d_in directions (m < d_in).
        scale = (torch.diagonal(M).mean()).detach().clamp_min(torch.finfo(C.dtype).tiny)
        M = M + (ridge * scale) * eye
    L_M, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        raise ValueError(
            "merge: the regularization Gram matrix C_reg^T C_reg is not positive definite; "
            f"increase ridge (now {ridge:g}) or compute in float64 (dtype=torch.float64)."
        )
    dT = torch.cholesky_solve(C.T, L_M)  # M^{-1} C^T, d_in x r
    S = C @ dT
    S = 0.5 * (S + S.T)  # symmetric in exact arithmetic; remove rounding asymmetry
    if constraint_ridge > 0:
        # Soft constraint: the exact minimizer of ||(W-W0)C_reg^T||^2 + ||W C^T - V^T||^2 / mu, mu relative.
        S = S + constraint_ridge * torch.diagonal(S).mean().detach() * torch.eye(r, dtype=S.dtype, device=S.device)
    # Detect a (numerically) singular constraint system before it turns into inf/NaN weights.
    eig = torch.linalg.eigvalsh(S.detach())
    tol = rcond if rcond is not None else 100 * torch.finfo(S.dtype).eps
    if not bool(torch.isfinite(eig).all()) or eig[0] <= tol * eig[-1].abs():
        cond = (eig[-1] / eig[0]).item() if eig[0] > 0 else float("inf")
        raise ValueError(
            f"merge: the {r} x {r} constraint system d C^T is singular or ill-conditioned (condition number "
            f"{cond:.3g}, d_in = {d_in}). Target rows must be linearly independent: remove duplicate rows "
            "(mima_lib.method.merge.unique_rows), use fewer target prompts/tokens (at most d_in rows), increase ridge, "
            "compute in float64 (dtype=torch.float64), or relax the constraint with constraint_ridge > 0."
        )
    L_S = torch.linalg.cholesky(S)
    return dT.T, L_S


def _apply_merge(W0: Tensor, C: Tensor, V: Tensor, d: Tensor, L_S: Tensor) -> Tensor:
    """W = W0 + (V^T - W0 C^T) S^{-1} d with S = L_S L_S^T symmetric."""
    if W0.shape[1] != C.shape[1] or V.shape != (C.shape[0], W0.shape[0]):
        raise ValueError(
            f"shape mismatch: W0 {tuple(W0.shape)}, C {tuple(C.shape)}, V {tuple(V.shape)} "
            "(expected W0 d_out x d_in, C r x d_in, V r x d_out)"
        )
    R = V.T - W0 @ C.T  # residual on the targets, d_out x r
    X = torch.cholesky_solve(R.T, L_S).T  # R S^{-1}
    return W0 + X @ d


def merge_projection(
    W0: Tensor,
    C: Tensor,
    V: Tensor,
    C_reg: Tensor,
    ridge: float = 1e-6,
    dtype: torch.dtype | None = None,
    constraint_ridge: float = 0.0,
    rcond: float | None = None,
) -> Tensor:
    """Closed-form merged weight for one projection (see module docstring).

    Args: W0 (d_out x d_in), C (r x d_in), V (r x d_out), C_reg (m x d_in). ``ridge`` is added to
    ``C_reg^T C_reg`` times its mean diagonal. ``dtype`` (e.g. ``torch.float64``) is the compute precision;
    the result has W0's dtype. ``constraint_ridge > 0`` turns the equality into a penalty (see
    ``_merge_system``). Raises ValueError instead of returning NaN when the target rows are (nearly) linearly
    dependent; duplicates are not removed here because their targets V may disagree (use :func:`unique_rows`).
    """
    if C.dim() != 2 or C.shape[0] == 0:
        raise ValueError(f"C must be a non-empty (r x d_in) matrix, got {tuple(C.shape)}")
    if C.shape[0] > C.shape[1] and constraint_ridge == 0:
        raise ValueError(
            f"merge: {C.shape[0]} target rows but d_in = {C.shape[1]}: the constraints W C^T = V cannot all hold. "
            "Use fewer target prompts/tokens, remove duplicate rows (mima_lib.method.merge.unique_rows), "
            "or relax the constraint with constraint_ridge > 0."
        )
    cd = _compute_dtype(dtype, W0, C, V, C_reg)
    d, L_S = _merge_system(C.to(cd), C_reg.to(cd), ridge, constraint_ridge, rcond)
    return _apply_merge(W0.to(cd), C.to(cd), V.to(cd), d, L_S).to(W0.dtype)


def merge_cross_attention(
    base_weights: dict[str, Tensor],
    adapted: list[dict[str, Tensor]],
    concept_embeddings: list[Tensor],
    reg_embeddings: Tensor,
    ridge: float = 1e-6,
    dtype: torch.dtype | None = None,
    constraint_ridge: float = 0.0,
    atol: float = 1e-5,
) -> dict[str, Tensor]:
    """Merge N adapted copies of every projection in ``base_weights`` (pass the attn2 K/V weights).

    Concept n contributes target rows ``C_n`` with outputs ``C_n W'_n^T`` (its adapted weight on its own
    tokens). Rows shared across concepts (e.g. a common prompt prefix) are kept once, with the first
    concept's target, since the equality constraints cannot hold twice with different values.
    """
    if len(adapted) != len(concept_embeddings) or not adapted:
        raise ValueError(
            f"need one adapted state per concept: got {len(adapted)} states, {len(concept_embeddings)} embeddings"
        )
    C_all = torch.cat(list(concept_embeddings), dim=0)
    keep = unique_rows(C_all, atol=atol)
    cd = _compute_dtype(dtype, C_all, reg_embeddings, *base_weights.values())
    C = C_all[keep].to(cd)
    if C.shape[0] > C.shape[1] and constraint_ridge == 0:
        raise ValueError(
            f"merge: {C.shape[0]} unique target rows but d_in = {C.shape[1]}. Use fewer target prompts/tokens "
            "or relax the constraint with constraint_ridge > 0."
        )
    d, L_S = _merge_system(C, reg_embeddings.to(cd), ridge, constraint_ridge, None)
    merged = {}
    for name, W0 in base_weights.items():
        missing = [n for n, a in enumerate(adapted) if name not in a]
        if missing:
            raise KeyError(f"{name} missing from adapted states {missing}")
        # Each concept's adapted weight applied to its own tokens, then the kept rows selected.
        V_all = torch.cat(
            [c.to(cd) @ a[name].to(cd).T for c, a in zip(concept_embeddings, adapted)], dim=0
        )
        V = V_all[keep]
        merged[name] = _apply_merge(W0.to(cd), C, V, d, L_S).to(W0.dtype)
    return merged


def merge_mean(adapted: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Plain (differentiable) mean of the adapted copies, for parameters outside the cross-attention K/V."""
    if not adapted:
        raise ValueError("merge_mean needs at least one state dict")
    names = list(adapted[0])
    for n, a in enumerate(adapted[1:], start=1):
        if set(a) != set(names):
            raise KeyError(f"state {n} has different parameter names from state 0")
    return {k: torch.stack([a[k] for a in adapted]).mean(dim=0) for k in names}
