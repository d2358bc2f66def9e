"""Selective immunization (an option of this project, not the paper's): the upper level may change the
cross-attention K/V weights only along the text-state rows the *targets own*.

Cross-attention reads a prompt through K = W_k C and V = W_v C, with C the prompt's text-state rows. An update
W -> W + dW changes what another prompt draws only through dW c for its rows c. If dW = G P with P the projector
onto the span of the targets' own rows (their name, EOS and padding: the positions they share with no kept
prompt), and that span is orthogonal to the rows of the empty prompt and of the shared template, then

    (W + G P) c = W c   for every c orthogonal to the span,

so the unconditional branch of classifier-free guidance and every prompt whose rows the targets do not share
are drawn as before.

How much an untargeted prompt still moves is its rows' overlap with the span times how far the targets' K/V
move. ``rtol`` (ImmunizeConfig.row_rtol, 1e-3 by default; 0.1 in the toy defaults, ImmunizeConfig.toy) drops the span's weak
directions: a concept's rows are nearly rank one, and a direction with a tenth of the largest singular value
carries almost none of the targets' K/V but can be another concept's main one (on the toy's v3 model, an
untargeted object's share of six targets' span 0.11 -> 0.06). Two more options act on the overlap and the push (off by default; measured in
the README, issue #14's bar 4; on the v2 model):
- ``contrast`` narrows the span to the directions v in which the owned rows' mean energy is at least
  ``contrast`` times the kept (prior) prompts' rows' (A v = lambda (B + ridge) v, A and B the rows' second
  moments): what every prompt carries drops out. On the toy, 6 targets: an untargeted object's row share in the
  span 22% -> 8%, but its K/V change only 0.70 -> 0.59 (the rows of two concepts overlap about as random
  directions do in 128 dimensions);
- ``limit_change`` caps the targets' relative K/V change (ImmunizeConfig.kv_budget): with a cap of 3 no
  untargeted concept moved by more than 0.39 nor lost anything, but the attacker re-learned the targets sooner.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .text_tokens import encode_prompt_tokens

__all__ = ["owned_positions", "row_basis", "contrast_basis", "owned_row_projector", "target_row_projector",
           "project_update", "relative_change", "limit_change"]


def owned_positions(ids: list[int], others: list[list[int]]) -> int:
    """The first position of ``ids`` that no prompt of ``others`` shares as a common prefix (a causal text
    encoder gives identical rows on a common prefix, so the rows before it are not the prompt's own)."""
    start = 1  # BOS at least
    for o in others:
        k = 0
        while k < min(len(ids), len(o)) and ids[k] == o[k]:
            k += 1
        start = max(start, k)
    return start


def row_basis(rows: Tensor, rtol: float) -> Tensor:
    """Orthonormal columns spanning ``rows`` (R x D), singular values below rtol * the largest dropped."""
    rows = rows.double()
    if rows.numel() == 0:
        return rows.new_zeros(rows.shape[1], 0)
    u, s, _ = torch.linalg.svd(rows.T, full_matrices=False)
    return u[:, s > rtol * s.max()]


def contrast_basis(owned: Tensor, kept: Tensor, contrast: float, ridge: float = 1e-3) -> Tensor:
    """Orthonormal columns spanning the directions v with v'Av >= contrast * v'(B + ridge)v, where A and B are
    the mean second moments of the ``owned`` and ``kept`` rows (R x D) and ridge is relative to tr(B)/D."""
    O, K = owned.double(), kept.double()
    A, B = O.T @ O / len(O), K.T @ K / len(K)
    D = A.shape[0]
    L = torch.linalg.cholesky(B + ridge * torch.trace(B) / D * torch.eye(D, dtype=B.dtype))
    Linv = torch.linalg.inv(L)
    lam, V = torch.linalg.eigh(Linv @ A @ Linv.T)  # whitened by B: A v = lam (B + ridge) v
    U = Linv.T @ V[:, lam >= contrast]
    return torch.linalg.qr(U).Q if U.shape[1] else U


def owned_row_projector(owned: Tensor, shared: Tensor, rtol: float = 1e-3, kept: Tensor | None = None,
                        contrast: float = 0.0) -> Tensor:
    """D x D projector onto span(owned rows) with the span of ``shared`` rows removed (float64); with ``kept``
    rows and contrast > 0, the owned rows are first narrowed to ``contrast_basis``."""
    S = row_basis(shared, 1e-6)
    O = owned.T.double()
    if kept is not None and contrast > 0:
        O = contrast_basis(owned, kept, contrast)
    O = O - S @ (S.T @ O)
    U = row_basis(O.T, rtol)
    return U @ U.T


def target_row_projector(pipe, target_prompts: list[str], kept_prompts: list[str], rtol: float = 1e-3,
                         protect_prompts: list[str] = (), contrast: float = 0.0) -> Tensor:
    """The projector of the module docstring: the targets' own rows (every position the UNet sees, from the
    first one they share with no kept prompt nor ""), narrowed by ``contrast`` with every row of the kept
    prompts, "" and ``protect_prompts`` (0: not narrowed), then deflated against the rows of "", the shared
    prefixes and every row of ``protect_prompts`` (whose rows the targets share: "a photo of a cat" for
    "<new1> cat")."""
    tok = pipe.tokenizer
    others = list(dict.fromkeys(list(kept_prompts) + list(protect_prompts) + [""]))
    with torch.no_grad():
        rows = encode_prompt_tokens(pipe, list(target_prompts), include_padding=True)
        empty = encode_prompt_tokens(pipe, [""], include_padding=True)[0]
        protected = encode_prompt_tokens(pipe, list(protect_prompts), include_padding=True)
        kept = encode_prompt_tokens(pipe, list(kept_prompts), include_padding=True) if contrast > 0 else []
    length = rows[0].shape[0]
    ids = tok(list(target_prompts), padding="max_length", max_length=length, truncation=True).input_ids
    other_ids = tok(others, padding="max_length", max_length=length, truncation=True).input_ids
    owned, shared = [], [empty, *protected]
    for j, (r, i) in enumerate(zip(rows, ids)):  # the other targets' prompts count as others too
        k = owned_positions(list(i), [list(o) for o in other_ids] + [list(t) for t in ids[:j] + ids[j + 1:]])
        owned.append(r[k:])
        shared.append(r[:k])
    kept_rows = torch.cat([empty, *protected, *kept]).float() if contrast > 0 else None
    return owned_row_projector(torch.cat(owned).float(), torch.cat(shared).float(), rtol, kept_rows,
                               contrast).float()


def project_update(W: Tensor, W0: Tensor, P: Tensor) -> None:
    """In place: W <- W0 + (W - W0) P (the change kept only along the projector's rows; W is out x D)."""
    with torch.no_grad():
        W.copy_(W0 + (W - W0) @ P.to(W.dtype))


def relative_change(W: Tensor, W0: Tensor, rows: Tensor) -> float:
    """How far the outputs on ``rows`` (R x D) moved: ||(W - W0) rows'|| / ||W0 rows'||."""
    with torch.no_grad():
        r = rows.to(W.dtype)
        return float((r @ (W - W0).T).norm() / (r @ W0.T).norm().clamp_min(1e-12))


def limit_change(W: Tensor, W0: Tensor, rows: Tensor, budget: float) -> float:
    """In place: scale W - W0 down so that relative_change(W, W0, rows) <= budget; returns the change before.

    Why a budget: an untargeted prompt's rows overlap the targets' span by about what random directions do
    (~1/sqrt(D)), so what it loses grows with how far the targets' keys and values are pushed."""
    change = relative_change(W, W0, rows)
    if change > budget:
        with torch.no_grad():
            W.copy_(W0 + (W - W0) * (budget / change))
    return change
