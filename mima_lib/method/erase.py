"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024), closed-form erasure in cross-attention K/V.

MIMA's re-learning task first erases each concept this way (reference code: guide = the empty prompt,
lambda 0.5), then immunizes the erased model. For one projection W0 (d_out x d_in), erase rows c_i with
guide rows g_i, and preserve rows c_j, UCE solves

    min_W  sum_i ||W c_i - W0 g_i||^2 + s sum_j ||W c_j - W0 c_j||^2 + lam ||W - W0||_F^2,

whose solution is

    W = [sum_i (W0 g_i) c_i^T + s sum_j (W0 c_j) c_j^T + lam W0] [sum_i c_i c_i^T + s sum_j c_j c_j^T + lam I]^{-1}.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .text_tokens import encode_prompt_tokens

__all__ = ["uce_edit", "align_guide_rows", "erase_concepts"]

PAPER_LAM = 0.5  # UCE's reference ridge for erasing (SD v1-4)

_KV_MODULE_RE = re.compile(r"(^|\.)attn2\.to_[kv](\.base_layer)?$")  # base_layer: a peft-wrapped projection


def uce_edit(
    W0: Tensor,
    erase_embeddings: Tensor,
    guide_embeddings: Tensor,
    preserve_embeddings: Tensor | None = None,
    lam: float = 0.5,
    preserve_scale: float = 1.0,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """UCE closed form (module docstring). Rows: erase (e x d_in), guide (e x d_in, row i pairs with erase
    row i), preserve (p x d_in, may be empty or None). ``dtype`` is the compute precision (default: at least
    float32); the result has W0's dtype."""
    if erase_embeddings.shape != guide_embeddings.shape or erase_embeddings.dim() != 2:
        raise ValueError(
            f"erase and guide rows must be matching (e x d_in) matrices, got {tuple(erase_embeddings.shape)} "
            f"and {tuple(guide_embeddings.shape)}"
        )
    d_in = W0.shape[1]
    if preserve_embeddings is None:
        preserve_embeddings = erase_embeddings.new_zeros(0, d_in)
    if erase_embeddings.shape[1] != d_in or preserve_embeddings.shape[-1] != d_in:
        raise ValueError(f"embedding width must equal W0's d_in = {d_in}")
    if lam < 0 or preserve_scale < 0:
        raise ValueError(f"lam and preserve_scale must be >= 0, got {lam}, {preserve_scale}")
    cd = dtype or torch.promote_types(W0.dtype, torch.float32)
    W, Ce, G, Cp = (t.to(cd) for t in (W0, erase_embeddings, guide_embeddings, preserve_embeddings))
    # A = W0 G^T Ce + s W0 Cp^T Cp + lam W0  (d_out x d_in);  B = Ce^T Ce + s Cp^T Cp + lam I  (symmetric)
    A = (G @ W.T).T @ Ce + preserve_scale * (Cp @ W.T).T @ Cp + lam * W
    B = Ce.T @ Ce + preserve_scale * Cp.T @ Cp + lam * torch.eye(d_in, dtype=cd, device=W.device)
    # W_new = A B^{-1}  <=>  B W_new^T = A^T  (B symmetric)
    sol, info = torch.linalg.solve_ex(B, A.T)
    if int(info) != 0 or not bool(torch.isfinite(sol).all()):
        raise ValueError("uce_edit: singular system; use lam > 0")
    return sol.T.to(W0.dtype)


def align_guide_rows(erase_rows: Tensor, guide_rows: Tensor) -> Tensor:
    """Guide rows paired one-to-one with ``erase_rows`` (both: tokens after BOS, ending with the EOS row).

    Row k of the erase prompt takes guide row k; the two EOS rows are always paired, and erase rows beyond
    the guide's content tokens take the guide's EOS row (a longer guide is truncated). With the empty guide
    every erase row maps to the empty prompt's EOS embedding.
    """
    L, M = erase_rows.shape[0], guide_rows.shape[0]
    if L == 0 or M == 0:
        raise ValueError("each prompt must have at least its EOS row")
    idx = [min(k, M - 1) for k in range(L - 1)] + [M - 1]
    return guide_rows[torch.tensor(idx, device=guide_rows.device)]


def reference_rows(erase_full: Tensor, guide_full: Tensor, erase_eos: int, guide_eos: int) -> tuple[Tensor, Tensor]:
    """The bare concept text's rows, paired as UCE's reference code pairs them (token_positions='reference'):
    the name's token rows take the guide's last content row (BOS for ""), and from EOS on the rows are
    aligned (EOS with EOS, the padding with the padding), cut to the same length. The reference keeps only
    the name's last token; with a one-token name the two agree. We keep every token of the name: a name of
    several tokens ("van gogh") is otherwise still read from its first ones (measured on the toy model: van
    gogh stayed at 75% when only "gogh" onward was erased). Returns (erase rows, guide rows)."""
    L = erase_full.shape[0]
    tail = L - max(erase_eos, guide_eos)  # EOS and the padding both prompts have from their EOS on
    names = erase_full[1:erase_eos]
    erase = torch.cat([names, erase_full[erase_eos:erase_eos + tail]])
    guide = torch.cat([guide_full[guide_eos - 1:guide_eos].expand(len(names), -1),
                       guide_full[guide_eos:guide_eos + tail]])
    return erase, guide


def _rows(tokens: Tensor, token_positions: str) -> Tensor:
    if token_positions == "reference":
        return tokens  # preserved prompts: every row, BOS and padding included, as in the reference code
    if token_positions == "concept":
        return tokens[1:]  # every token after BOS, EOS included; BOS is the same for all prompts
    if token_positions == "eos":
        return tokens[-1:]
    if token_positions == "all":
        return tokens[1:]  # the caller encoded with padding: the UNet attends to the padding states too
    raise ValueError(f"token_positions must be 'reference', 'concept', 'eos' or 'all', got {token_positions!r}")


def _guide_rows_with_padding(erase_full: Tensor, guide_full: Tensor, erase_eos: int, guide_eos: int) -> Tensor:
    """token_positions='all': content and EOS rows paired as in align_guide_rows; every padding row of
    the erase prompt maps to the guide's last padding row (its summary of the guide prompt)."""
    content = align_guide_rows(erase_full[1:erase_eos + 1], guide_full[1:guide_eos + 1])
    pads = guide_full[-1:].expand(erase_full.shape[0] - erase_eos - 1, -1)
    return torch.cat([content, pads])


def erase_concepts(
    pipe,
    erase_prompts: list[str],
    guide_prompts: list[str] | str = "",
    preserve_prompts: list[str] | None = None,
    lam: float = 0.5,
    preserve_scale: float | None = None,
    token_positions: str = "reference",
    dtype: torch.dtype | None = None,
    preserve_positions: str | None = None,
) -> dict:
    """Erase concepts from ``pipe.unet`` in place by UCE-editing every ``attn2.to_k`` / ``attn2.to_v``.

    Row choice, ``token_positions="reference"`` (UCE's reference code, the default): erase the bare concept
    text ("van gogh", not "an artwork of van gogh"), its token rows, EOS and the padding, paired with the
    guide's by :func:`reference_rows`; preserve every row of each preserve prompt
    (give "" among them to keep the unconditional prompt, as the reference does). The ablations:
    ``token_positions="concept"``: for each erase prompt, all its token embeddings from
    position 1 (after BOS) to EOS inclusive, paired with the guide prompt's rows by
    :func:`align_guide_rows`; preserve rows are the same token range of each preserve prompt. This is
    broader than UCE's reference code (the concept's last token onward); ``"eos"`` uses only the EOS rows.
    ``"all"`` adds the padding positions after EOS, which a causal text encoder fills with states that
    still carry the concept (the toy model's encoder mixes strongly): each maps to the guide's last row.
    ``preserve_positions`` (default: ``token_positions``) chooses the preserve rows separately: padding
    states are nearly alike across prompts, so preserving other prompts' padding fights erasing it.
    Caveat: tokens shared with preserve prompts (a common "an artwork of" prefix under a causal encoder)
    get conflicting targets and are resolved by least squares, so keep erase prompts to the concept itself.

    ``preserve_scale`` None: the reference code's ``max(0.1, 1 / len(preserve_prompts))``.
    Returns ``{"layers_edited", "layer_names", "erase_rows", "preserve_rows", "preserve_scale"}``.
    """
    if isinstance(erase_prompts, str):
        erase_prompts = [erase_prompts]
    erase_prompts = list(erase_prompts)
    if not erase_prompts:
        raise ValueError("erase_concepts: erase_prompts is empty; give at least one concept prompt")
    if isinstance(guide_prompts, str):
        guide_prompts = [guide_prompts] * len(erase_prompts)
    guide_prompts = list(guide_prompts)
    if len(guide_prompts) != len(erase_prompts):
        raise ValueError(
            f"erase_concepts: {len(erase_prompts)} erase prompts but {len(guide_prompts)} guide prompts; "
            "give one guide per erase prompt or a single string for all"
        )
    preserve_prompts = list(preserve_prompts or [])
    if preserve_scale is None:
        preserve_scale = max(0.1, 1.0 / max(1, len(preserve_prompts)))
    _rows(torch.zeros(1, 1), token_positions)  # validate the option before the encoder runs

    pad = token_positions in ("all", "reference")
    preserve_positions = preserve_positions or token_positions
    _rows(torch.zeros(1, 1), preserve_positions)
    with torch.no_grad():
        erase_tok = encode_prompt_tokens(pipe, erase_prompts, include_padding=pad)
        guide_tok = encode_prompt_tokens(pipe, guide_prompts, include_padding=pad)
        preserve_tok = encode_prompt_tokens(pipe, preserve_prompts,
                                            include_padding=preserve_positions in ("all", "reference"))
        if pad:  # the padding is paired too: every position's EOS from the unpadded encoding
            e_eos = [len(t) - 1 for t in encode_prompt_tokens(pipe, erase_prompts)]
            g_eos = [len(t) - 1 for t in encode_prompt_tokens(pipe, guide_prompts)]
        if token_positions == "reference":
            pairs = [reference_rows(e, g, ee, ge) for e, g, ee, ge in zip(erase_tok, guide_tok, e_eos, g_eos)]
            Ce, G = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        elif pad:
            Ce = torch.cat([_rows(t, token_positions) for t in erase_tok])
            G = torch.cat([_guide_rows_with_padding(e, g, ee, ge)
                           for e, g, ee, ge in zip(erase_tok, guide_tok, e_eos, g_eos)])
        else:
            Ce = torch.cat([_rows(t, token_positions) for t in erase_tok])
            G = torch.cat([align_guide_rows(_rows(e, token_positions), _rows(g, token_positions))
                           for e, g in zip(erase_tok, guide_tok)])
        d = Ce.shape[1]
        Cp = torch.cat([_rows(t, preserve_positions) for t in preserve_tok]) if preserve_tok else Ce.new_zeros(0, d)

        names = []
        for name, module in pipe.unet.named_modules():
            if not (_KV_MODULE_RE.search(name) and isinstance(module, nn.Linear)):
                continue
            W0 = module.weight
            dev = W0.device
            new = uce_edit(W0, Ce.to(dev), G.to(dev), Cp.to(dev), lam, preserve_scale, dtype=dtype)
            W0.copy_(new)
            names.append(name)
    if not names:
        raise ValueError("erase_concepts: no attn2.to_k / attn2.to_v linear layers found in pipe.unet")
    return {"layers_edited": len(names), "layer_names": names, "erase_rows": Ce.shape[0], "preserve_rows": Cp.shape[0],
            "preserve_scale": preserve_scale}
