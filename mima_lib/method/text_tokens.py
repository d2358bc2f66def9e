"""Per-token text-encoder embeddings of prompts, the rows that closed-form cross-attention edits act on.

Shared by the UCE erasure (:mod:`mima_lib.method.erase`) and the Custom Diffusion merge (:mod:`mima_lib.method.merge`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["eos_positions", "encode_prompt_tokens"]


def eos_positions(input_ids: Tensor, eos_token_id: int) -> Tensor:
    """Index of the first ``eos_token_id`` after position 0 in every row of ``input_ids`` (batch x length).

    Position 0 is skipped because some tokenizers use one id for BOS and EOS. In SD's CLIP tokenizer the
    padding token is also EOS, so the *first* occurrence is the real end of the prompt. A row without EOS
    (should not happen with truncation) gets its last position.
    """
    is_eos = input_ids == eos_token_id
    is_eos[:, 0] = False
    last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
    pos = torch.argmax(is_eos.int(), dim=1)  # first True (argmax returns the first maximum)
    return torch.where(is_eos.any(dim=1), pos, last)


def encode_prompt_tokens(pipe, prompts: list[str] | str, max_length: int | None = None,
                         include_padding: bool = False) -> list[Tensor]:
    """Per prompt, the text encoder's ``last_hidden_state`` rows from position 0 (BOS) to EOS inclusive
    (with ``include_padding``: every position, the padding after EOS too).

    Tokenizes and encodes exactly as ``StableDiffusionPipeline.encode_prompt`` does (padding to the model
    length, no attention mask unless the encoder's config asks for one), so the rows are the ones the UNet's
    cross-attention sees. Gradients are not disabled here: wrap in ``torch.no_grad()`` when not needed.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        return []
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    if max_length is None:
        max_length = tokenizer.model_max_length
        # A tokenizer built without model_max_length reports a huge sentinel: cap at the encoder's positions.
        n_pos = getattr(text_encoder.config, "max_position_embeddings", None)
        if n_pos is not None:
            max_length = min(max_length, n_pos)
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    input_ids = enc.input_ids.to(text_encoder.device)
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = enc.attention_mask.to(text_encoder.device)
    hidden = text_encoder(input_ids, attention_mask=mask)[0]  # last_hidden_state, batch x length x d
    eos = eos_positions(input_ids, tokenizer.eos_token_id).tolist()
    if include_padding:
        return [hidden[i] for i in range(len(prompts))]
    return [hidden[i, : e + 1] for i, e in enumerate(eos)]
