"""Selective immunization (an option of this project, not the paper's): the upper level may change the
cross-attention K/V weights only along the text-state rows the *targets own*.

Cross-attention reads a prompt through K = W_k C and V = W_v C, with C the prompt's text-state rows. An update
W -> W + dW changes what another prompt draws only through dW c for its rows c. If dW = G P with P the projector
onto the span of the targets' own rows (their name, EOS and padding: the positions they share with no kept
prompt), and that span is orthogonal to the rows of the empty prompt and of the shared template, then

    (W + G P) c = W c   for every c orthogonal to the span,

so the unconditional branch of classifier-free guidance and every prompt whose rows the targets do not share
are drawn as before. How selective that is depends on the text encoder: on the toy model v2 the rows a concept
owns are nearly orthogonal to every other concept's (mima_lib.toy.text.text_statistics).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .text_tokens import encode_prompt_tokens

__all__ = ["owned_positions", "owned_row_projector", "target_row_projector", "project_update"]


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


def _basis(rows: Tensor, rtol: float) -> Tensor:
    """Orthonormal columns spanning ``rows`` (R x D), singular values below rtol * the largest dropped."""
    if rows.numel() == 0:
        return rows.new_zeros(rows.shape[1], 0)
    u, s, _ = torch.linalg.svd(rows.T.double(), full_matrices=False)
    return u[:, s > rtol * s.max()]


def owned_row_projector(owned: Tensor, shared: Tensor, rtol: float = 1e-3) -> Tensor:
    """D x D projector onto span(owned rows) with the span of ``shared`` rows removed first (float64)."""
    S = _basis(shared, 1e-6)
    O = owned.T.double()
    O = O - S @ (S.T @ O)
    U = _basis(O.T, rtol)
    return U @ U.T


def target_row_projector(pipe, target_prompts: list[str], kept_prompts: list[str], rtol: float = 1e-3,
                         protect_prompts: list[str] = ()) -> Tensor:
    """The projector of the module docstring: the targets' own rows (every position the UNet sees, from the
    first one they share with no kept prompt nor "") deflated against the rows of "", the shared prefixes and
    every row of ``protect_prompts`` (whose rows the targets share: "a photo of a cat" for "<new1> cat")."""
    tok = pipe.tokenizer
    others = list(dict.fromkeys(list(kept_prompts) + list(protect_prompts) + [""]))
    with torch.no_grad():
        rows = encode_prompt_tokens(pipe, list(target_prompts), include_padding=True)
        empty = encode_prompt_tokens(pipe, [""], include_padding=True)[0]
        protected = encode_prompt_tokens(pipe, list(protect_prompts), include_padding=True)
    length = rows[0].shape[0]
    ids = tok(list(target_prompts), padding="max_length", max_length=length, truncation=True).input_ids
    other_ids = tok(others, padding="max_length", max_length=length, truncation=True).input_ids
    owned, shared = [], [empty, *protected]
    for j, (r, i) in enumerate(zip(rows, ids)):  # the other targets' prompts count as others too
        k = owned_positions(list(i), [list(o) for o in other_ids] + [list(t) for t in ids[:j] + ids[j + 1:]])
        owned.append(r[k:])
        shared.append(r[:k])
    return owned_row_projector(torch.cat(owned).float(), torch.cat(shared).float(), rtol).float()


def project_update(W: Tensor, W0: Tensor, P: Tensor) -> None:
    """In place: W <- W0 + (W - W0) P (the change kept only along the projector's rows; W is out x D)."""
    with torch.no_grad():
        W.copy_(W0 + (W - W0) @ P.to(W.dtype))
