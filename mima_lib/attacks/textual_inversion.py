"""Textual Inversion attack: a new token (e.g. `<new1>`) whose input embedding alone is trained,
initialised from an existing word; the model's weights stay untouched. With `num_vectors: k` the placeholder
stands for k new tokens `<new1> <new1>_1 ... <new1>_{k-1}` (diffusers' --num_vectors), for concepts whose
name is several words: one vector cannot stand in for the two text-state rows of "van gogh".

Saved as diffusers' `learned_embeds.safetensors` ({token: (k, dim) tensor}), so
`pipe.load_textual_inversion(folder)` reloads it (as does `load_textual_inversion` here).
Reference code: diffusers' train_textual_inversion.py, lr 5e-4 (x batch size with --scale_lr), batch 1.

The token helpers (`check_new_token`, `add_tokens`, `TokenFreezer`) are shared with Custom Diffusion's
modifier tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .common import DEFAULT_SNAPSHOT_STEPS, AttackResult, attack_setup, finetune, freeze_pipeline

TI_WEIGHT_NAME = "learned_embeds.safetensors"


@dataclass
class TextualInversionSettings:
    """Textual Inversion settings; defaults are the paper's (SD v1-4). `.toy()` for the toy model.

    The prompt given to the attack must contain `token`, e.g. "a photo of <new1> cat" (personalization)
    or "a photo of a <new1>" (re-learning an erased object under a new word)."""

    token: str = "<new1>"
    initializer_token: str = "object"  # an existing single-token word; the new embedding starts as its copy
    num_vectors: int = 1  # new tokens the placeholder stands for (diffusers' multi-vector TI)
    steps: int = 40  # the paper's tables report step 40 (the reference script ran up to 2000)
    lr: float = 5e-4
    batch_size: int = 1
    hflip: bool = False
    schedule: str = "constant"  # 'constant' (the reference scripts') | 'cosine' (decays to 0 at `steps`)
    seed: int = 0
    snapshot_steps: tuple[int, ...] = DEFAULT_SNAPSHOT_STEPS

    @classmethod
    def paper(cls, **overrides) -> "TextualInversionSettings":
        return replace(cls(), **overrides)

    @classmethod
    def toy(cls, **overrides) -> "TextualInversionSettings":
        """Measured on the toy model (erased 'cat', prompt 'a photo of a <new1>'): lr 0.2, batch 4 peaks at
        0.79-0.88 oracle accuracy around step 40-60 for two of three seeds (0.46 for the third); lower lrs
        (0.05-0.1) stay below 0.5 even after 300 steps. 100 steps: on the v2 model with three artists erased,
        claude monet / kelly mckernan reach 0.44 / 0.69 by step 60 and 1.0 / 1.0 by step 80-100 (van gogh
        0.25: one new token does not re-learn it; scripts/toy_bars.py --only relearn, 16 generations).
        num_vectors=3, 160 steps: van gogh's two words and the rows after them need more than one vector;
        with the three artists erased, best snapshot van gogh / monet / mckernan 0.81 / 0.94 / 0.94 (two vectors
        for 100 steps: 0.62 / 0.94 / 0.81; three for 100: 0.62 / 0.94 / 0.94, van gogh still rising).
        lr=0.3: with all six of issue #14's targets erased at once, lr 0.2 re-learned van gogh to 0.62 at best
        (cosine schedule 0.44, 4 vectors 0.62, lr 0.1 for 240 steps 0.44, batch 8 0.56, hflip 0.44); lr 0.3
        reached cat / umbrella / car / van gogh / monet / mckernan 1.0 / 1.0 / 0.88 / 0.81 / 1.0 / 1.0. On a set
        no file uses (dog, fish, apple, tyler edlin, kilian eng, pablo picasso; seed 1) neither passes: two of
        the three artists stay below 0.7 (lr 0.3: 0.50 / 1.0 / 0.44; lr 0.2: 0.88 / 0.69 / 0.31).
        num_vectors=5, steps=320 on the v4 model: with the six erased as the erasure stage erases them, three
        vectors for 240 steps re-learned van gogh to 0.44 at best (the other five 0.94-1.0); on van gogh alone
        (20 renders, 16 generations): 3 / 4 / 5 / 6 / 8 vectors 0.44 / 0.62 / 0.69 / 0.69 / 0.56 by step 240, and
        with 320 steps 4 / 5 / 6 vectors 0.69 / 0.94 / 0.81 (5 vectors for 400: 0.94 at 280-360, 0.88 at 400).
        steps=640: pablo picasso, erased with the held-out six, re-learns slowly and unevenly across the
        attacker's 20 renders: best by step 320 0.81 / 0.19 / 0.69 for three draws (the second is seed 1's),
        best by step 640 0.94 / 0.94 on the two slow ones (on seed 1's draw lr 0.2 / 0.5, 8 vectors, hflip, a
        cosine schedule or the initializer "artwork" reached 0.25-0.69 by 320; batch 8 reached 1.0 by 480 at
        1.5x the cost); van gogh with the bar's six erased 0.94 by 280, the same by 640 (a probe on 16 generations)."""
        return replace(cls(lr=3e-1, batch_size=4, num_vectors=5, steps=640,
                           snapshot_steps=tuple(range(0, 641, 40))), **overrides)


def in_vocabulary(tokenizer, token: str) -> bool:
    """True if `token` already names a vocabulary entry (as an added token or as a whole word)."""
    vocab = tokenizer.get_vocab()
    return token in vocab or f"{token}</w>" in vocab


def check_new_token(tokenizer, token: str) -> None:
    if not isinstance(token, str) or not token.strip() or token != token.strip() or " " in token:
        raise ValueError(f"a new token must be one non-empty word without spaces, got {token!r}")
    if in_vocabulary(tokenizer, token):
        raise ValueError(f"token {token!r} is already in the tokenizer's vocabulary; choose a new one such as "
                         "'<new1>' (or attack a fresh copy of the model if an earlier attack added it)")


def initializer_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"initializer_token {word!r} is {len(ids)} tokens {pieces}; it must be a single token "
                         "(a common word)")
    return ids[0]


def add_tokens(pipe, tokens: list[str], initializer_words: list[str]) -> list[int]:
    """Add new tokens to pipe's tokenizer, grow the text encoder's embedding table, and set each new row
    to its initializer word's embedding. Validates everything before changing anything."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    if len(tokens) != len(initializer_words):
        raise ValueError(f"{len(tokens)} new tokens but {len(initializer_words)} initializer words")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"new tokens must be distinct, got {tokens}")
    for t in tokens:
        check_new_token(tok, t)
    init_ids = [initializer_id(tok, w) for w in initializer_words]
    tok.add_tokens(list(tokens))
    ids = tok.convert_tokens_to_ids(list(tokens))
    enc.resize_token_embeddings(len(tok), mean_resizing=False)  # rows are set below
    with torch.no_grad():
        weight = enc.get_input_embeddings().weight
        for i, j in zip(ids, init_ids):
            weight[i] = weight[j]
    return ids


def placeholder_tokens(token: str, num_vectors: int) -> list[str]:
    """The new tokens of a k-vector placeholder, named as diffusers' loader and pipelines expect them."""
    if num_vectors < 1:
        raise ValueError(f"num_vectors must be >= 1, got {num_vectors}")
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_placeholder(prompt: str, token: str, tokens: list[str]) -> str:
    """The prompt the text encoder sees: the placeholder word replaced by all its tokens. (The pipelines do the
    same on their own, by TextualInversionLoaderMixin.maybe_convert_prompt, so generation takes the short one.)"""
    return " ".join(" ".join(tokens) if w == token else w for w in prompt.split())


def require_tokens_in_prompt(prompt: str, tokens: list[str], what: str) -> None:
    missing = [t for t in tokens if t not in prompt.split()]
    if missing:
        raise ValueError(f"the prompt {prompt!r} does not contain the {what} {missing}; write it as a word, e.g. "
                         f"'a photo of {missing[0]} cat'")


class TokenFreezer:
    """Train only some rows of the input-embedding table: masks the gradient of every other row and,
    after each update, restores them exactly (so optimizer state or weight decay cannot drift them)."""

    def __init__(self, text_encoder, train_ids: list[int]):
        self.weight = text_encoder.get_input_embeddings().weight
        self.original = self.weight.detach().clone()
        self.frozen = torch.ones(self.weight.shape[0], dtype=torch.bool, device=self.weight.device)
        self.frozen[list(train_ids)] = False
        self.weight.requires_grad_(True)
        mask = (~self.frozen).to(self.weight.dtype)[:, None]
        self._hook = self.weight.register_hook(lambda g: g * mask)

    def restore(self, step: int | None = None) -> None:
        with torch.no_grad():
            self.weight[self.frozen] = self.original[self.frozen]

    def remove(self) -> None:
        self._hook.remove()


def textual_inversion_attack(pipe, images, prompt: str, settings: TextualInversionSettings | None = None,
                             **finetune_kwargs) -> AttackResult:
    """Add `settings.token` to pipe's tokenizer (in place) and train its embedding on the images.

    Raises ValueError if the token is already in the vocabulary or the prompt does not contain it."""
    settings = settings or TextualInversionSettings()
    cfg, kw = attack_setup(settings, "textual inversion", finetune_kwargs, pipe, [(images, prompt)])
    require_tokens_in_prompt(prompt, [settings.token], "placeholder token")
    tokens = placeholder_tokens(settings.token, settings.num_vectors)
    freeze_pipeline(pipe)
    ids = add_tokens(pipe, tokens, [settings.initializer_token] * len(tokens))
    freezer = TokenFreezer(pipe.text_encoder, ids)
    params = {"text_encoder.token_embedding": freezer.weight}
    train_prompt = expand_placeholder(prompt, settings.token, tokens)
    try:
        result = finetune(pipe, images, train_prompt, params, cfg, batch_size=settings.batch_size, hflip=settings.hflip,
                          text_params_changed=True, after_step=freezer.restore,
                          **kw)
    finally:
        freezer.remove()
        pipe.text_encoder.requires_grad_(False)
    result.method, result.settings, result.tokens = "textual_inversion", settings, tokens
    return result


def token_embeddings(pipe, tokens: list[str]) -> dict[str, torch.Tensor]:
    """{token: (1, dim) embedding}, the layout diffusers' load_textual_inversion reads."""
    weight = pipe.text_encoder.get_input_embeddings().weight
    out = {}
    for t in tokens:
        if t not in pipe.tokenizer.get_vocab():
            raise ValueError(f"token {t!r} is not in the tokenizer; nothing to save")
        out[t] = weight[pipe.tokenizer.convert_tokens_to_ids(t)].detach().cpu().clone()[None]
    return out


def save_textual_inversion(pipe, folder, token: str = "<new1>", weight_name: str = TI_WEIGHT_NAME) -> Path:
    """Write <folder>/learned_embeds.safetensors = {token: (k, dim)}, k the placeholder's vectors (its tokens
    `token`, `token_1`, ... in the tokenizer); reload with `pipe.load_textual_inversion(folder)` on a model
    without the token."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / weight_name
    tokens, vocab = [token], pipe.tokenizer.get_vocab()
    while f"{token}_{len(tokens)}" in vocab:
        tokens.append(f"{token}_{len(tokens)}")
    rows = token_embeddings(pipe, tokens)
    save_file({token: torch.cat([rows[t] for t in tokens]).contiguous()}, path)
    return path


def load_textual_inversion(pipe, path, token: str | None = None, weight_name: str | None = None):
    """Load a saved embedding into pipe (in place) through diffusers' `load_textual_inversion`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"textual inversion path {path} does not exist")
    if path.is_dir() and weight_name is None and not (path / TI_WEIGHT_NAME).exists():
        raise FileNotFoundError(f"no {TI_WEIGHT_NAME} in {path}; save one with save_textual_inversion")
    if path.is_file():
        path, weight_name = path.parent, path.name
    pipe.load_textual_inversion(str(path), token=token, weight_name=weight_name, local_files_only=True)
    return pipe
