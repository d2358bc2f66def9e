"""Custom Diffusion attack (Kumari et al., CVPR 2023): fine-tune only the cross-attention key and value
projections (`attn2.to_k`, `attn2.to_v`; optionally also `to_q` and `to_out`), plus the embedding of a
modifier token such as `<new1>` ("a photo of <new1> cat"). Single concept, or several concepts trained
jointly, each with its own modifier token (`custom_diffusion_multi_attack`).

The attack trains the UNet's own attn2 weights in place (no extra processors), so the adapted model is
an ordinary pipeline that erasure, merging and further attacks handle like any other. `save_custom_diffusion`
writes diffusers' Custom Diffusion format:
- `pytorch_custom_diffusion_weights.safetensors` (keys `<layer>.processor.to_k_custom_diffusion.weight`, ...),
  which `load_custom_diffusion` copies back into the attn2 weights;
- `pytorch_custom_diffusion_weights.bin` (same tensors plus the empty entries diffusers' loader needs), for
  `pipe.unet.load_attn_procs(folder, weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=pipe)`
  (diffusers 0.42 only installs the processors when `_pipeline` is given, and cannot read the
  safetensors file, which lacks the empty entries);
- `<token>.safetensors` per modifier token, for `pipe.load_textual_inversion(folder, weight_name=...)`;
- `custom_diffusion.json`: the tokens and which projections were trained.

Reference: diffusers' train_custom_diffusion.py (lr 1e-5 scaled by batch size 2, freeze_model crossattn_kv; its
modifier token starts from "ktn", which SD's CLIP tokenizer splits in two, so ours starts from "sks"). Not
reproduced: the reference's detach of the BOS position's key/value gradient.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .common import DEFAULT_SNAPSHOT_STEPS, AttackResult, attack_setup, finetune_concepts, freeze_pipeline
from .textual_inversion import TokenFreezer, add_tokens, require_tokens_in_prompt, token_embeddings

CD_WEIGHT_NAME = "pytorch_custom_diffusion_weights.safetensors"
CD_WEIGHT_NAME_BIN = "pytorch_custom_diffusion_weights.bin"
CD_META_NAME = "custom_diffusion.json"


@dataclass
class CustomDiffusionSettings:
    """Custom Diffusion settings; defaults are the paper's (SD v1-4). `.toy()` for the toy model.

    modifier_token: None (re-learning: train K/V under the concept's own prompt), a token such as
    "<new1>" (personalization), or a tuple of tokens, one per concept, for the multi-concept attack."""

    modifier_token: str | tuple[str, ...] | None = None
    # a rare word that is one token in SD's CLIP vocabulary ("sks", id 48136): diffusers' "ktn" is two there
    initializer_token: str | tuple[str, ...] = "sks"
    train_q_out: bool = False  # False: K/V only (freeze_model crossattn_kv); True: also Q and out
    steps: int = 40  # the paper's tables report step 40 (Custom Diffusion's recipe: 250, 500 multi-concept)
    lr: float = 2e-5  # 1e-5 x batch size 2 (--scale_lr)
    batch_size: int = 2
    hflip: bool = False
    schedule: str = "constant"  # 'constant' (the reference scripts') | 'cosine' (decays to 0 at `steps`)
    seed: int = 0
    snapshot_steps: tuple[int, ...] = DEFAULT_SNAPSHOT_STEPS

    @classmethod
    def paper(cls, **overrides) -> "CustomDiffusionSettings":
        return replace(cls(), **overrides)

    @classmethod
    def toy(cls, **overrides) -> "CustomDiffusionSettings":
        """Measured on the toy model (erased 'cat'): lr 1e-3, batch 4 reaches 0.69-0.88 oracle accuracy by
        step 20-30 (seed-dependent); 3e-3 overshoots. The toy vocabulary has no 'ktn', so a modifier token
        starts from the filler word 'my'."""
        return replace(cls(lr=1e-3, batch_size=4, steps=40, initializer_token="my"), **overrides)

    def tokens(self) -> list[str]:
        t = self.modifier_token
        return [] if t is None else [t] if isinstance(t, str) else list(t)

    def initializers(self) -> list[str]:
        n = len(self.tokens())
        init = self.initializer_token
        init = [init] * n if isinstance(init, str) else list(init)
        if len(init) != n:
            raise ValueError(f"{n} modifier tokens but {len(init)} initializer tokens")
        return init


def attn2_modules(unet) -> dict[str, torch.nn.Module]:
    """The UNet's cross-attention modules by name (the layers Custom Diffusion and MIMA's merge act on)."""
    mods = {n: m for n, m in unet.named_modules() if n.endswith("attn2") and hasattr(m, "to_k")}
    if not mods:
        raise ValueError("the UNet has no cross-attention (attn2) layers; Custom Diffusion needs them")
    return mods


def _linear(module):
    return getattr(module, "base_layer", module)  # the plain Linear under a peft LoRA wrapper


def custom_diffusion_tensors(unet, train_q_out: bool) -> dict[str, torch.Tensor]:
    """{diffusers Custom Diffusion key: the attn2 parameter it stands for} (live parameters, not copies)."""
    out = {}
    for name, m in attn2_modules(unet).items():
        key = f"{name}.processor"
        out[f"{key}.to_k_custom_diffusion.weight"] = _linear(m.to_k).weight
        out[f"{key}.to_v_custom_diffusion.weight"] = _linear(m.to_v).weight
        if train_q_out:
            out[f"{key}.to_q_custom_diffusion.weight"] = _linear(m.to_q).weight
            out[f"{key}.to_out_custom_diffusion.0.weight"] = _linear(m.to_out[0]).weight
            if _linear(m.to_out[0]).bias is not None:
                out[f"{key}.to_out_custom_diffusion.0.bias"] = _linear(m.to_out[0]).bias
    return out


def custom_diffusion_multi_attack(pipe, concepts, settings: CustomDiffusionSettings | None = None,
                                  **finetune_kwargs) -> AttackResult:
    """Train attn2 K/V (and Q/out if asked) plus one modifier token per concept on several concepts
    jointly, in place. concepts: [(images, prompt), ...]; with modifier tokens, prompt i must contain
    token i (e.g. "a photo of <new1> cat", "a photo of <new2> dog")."""
    settings = settings or CustomDiffusionSettings()
    concepts = list(concepts)
    if not concepts:
        raise ValueError("custom diffusion got no concepts; pass [(images, prompt), ...]")
    cfg, kw = attack_setup(settings, "custom diffusion", finetune_kwargs, pipe, concepts)
    tokens = settings.tokens()
    if tokens and len(tokens) not in (1, len(concepts)):
        raise ValueError(f"{len(concepts)} concepts but {len(tokens)} modifier tokens; give one per concept")
    for i, (_, prompt) in enumerate(concepts):
        if tokens:
            require_tokens_in_prompt(prompt, [tokens[i if len(tokens) > 1 else 0]], "modifier token")
    inits = settings.initializers()
    ids = add_tokens(pipe, tokens, inits) if tokens else []  # validates the tokens before changing anything
    freeze_pipeline(pipe)
    params = custom_diffusion_tensors(pipe.unet, settings.train_q_out)
    for p in params.values():
        p.requires_grad_(True)
    freezer = None
    if tokens:
        freezer = TokenFreezer(pipe.text_encoder, ids)
        params["text_encoder.token_embedding"] = freezer.weight
    try:
        result = finetune_concepts(pipe, concepts, params, cfg, batch_size=settings.batch_size, hflip=settings.hflip,
                                   text_params_changed=bool(tokens),
                                   after_step=freezer.restore if freezer else None,
                                   **kw)
    finally:
        if freezer is not None:
            freezer.remove()
        freeze_pipeline(pipe)
    result.method, result.settings, result.tokens = "custom_diffusion", settings, tokens
    return result


def custom_diffusion_attack(pipe, images, prompt: str, settings: CustomDiffusionSettings | None = None,
                            **finetune_kwargs) -> AttackResult:
    """Single-concept Custom Diffusion, in place (see custom_diffusion_multi_attack)."""
    settings = settings or CustomDiffusionSettings()
    if len(settings.tokens()) > 1:
        raise ValueError(f"one concept but modifier tokens {settings.tokens()}; use custom_diffusion_multi_attack")
    return custom_diffusion_multi_attack(pipe, [(images, prompt)], settings, **finetune_kwargs)


def save_custom_diffusion(pipe, folder, tokens: list[str] | tuple[str, ...] = (), train_q_out: bool = False,
                          diffusers_bin: bool = True) -> Path:
    """Write the attn2 weights in diffusers' Custom Diffusion format, plus one `<token>.safetensors`
    embedding per modifier token (see the module docstring). Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone()
             for k, v in custom_diffusion_tensors(pipe.unet, train_q_out).items()}
    save_file(state, folder / CD_WEIGHT_NAME, metadata={"format": "pt"})
    if diffusers_bin:
        full = dict(state)
        for name in pipe.unet.attn_processors:  # diffusers' loader wants every attention layer listed
            if not any(k.startswith(name + ".") for k in state):
                full[name] = {}
        torch.save(full, folder / CD_WEIGHT_NAME_BIN)
    for t in tokens:
        save_file(token_embeddings(pipe, [t]), folder / f"{t}.safetensors")
    (folder / CD_META_NAME).write_text(json.dumps({"tokens": list(tokens), "train_q_out": train_q_out}, indent=1))
    return folder


def load_custom_diffusion(pipe, folder):
    """Copy saved Custom Diffusion weights into pipe's attn2 layers and add its modifier tokens (in place)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CD_WEIGHT_NAME).exists():
        raise FileNotFoundError(f"no {CD_WEIGHT_NAME} in {folder}; save one with save_custom_diffusion")
    state = load_file(folder / CD_WEIGHT_NAME)
    meta = json.loads((folder / CD_META_NAME).read_text()) if (folder / CD_META_NAME).exists() else {}
    train_q_out = any("to_q_custom_diffusion" in k for k in state)
    targets = custom_diffusion_tensors(pipe.unet, train_q_out)
    unknown = sorted(set(state) - set(targets))
    if unknown:
        raise ValueError(f"{folder / CD_WEIGHT_NAME} does not fit this UNet: no layer for {unknown[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(targets[k].shape):
            raise ValueError(f"{k}: saved shape {tuple(v.shape)} but the UNet's is {tuple(targets[k].shape)}")
    with torch.no_grad():
        for k, v in state.items():
            targets[k].copy_(v.to(targets[k].device, targets[k].dtype))
    for t in meta.get("tokens", []):
        pipe.load_textual_inversion(str(folder), weight_name=f"{t}.safetensors", local_files_only=True)
    return pipe
