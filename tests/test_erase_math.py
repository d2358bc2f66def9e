"""Tests of mima_lib.erase (UCE closed-form erasure) and mima_lib.text_tokens, offline and tiny."""

import os
import string

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from mima_lib.method.erase import align_guide_rows, erase_concepts, uce_edit
from mima_lib.method.text_tokens import encode_prompt_tokens, eos_positions

torch.set_num_threads(1)

F64 = torch.float64


def _mats(d_out=6, d_in=16, e=3, p=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return r(d_out, d_in), r(e, d_in), r(e, d_in), r(p, d_in)


def test_uce_erase_rows_map_to_guide_outputs():
    W0, Ce, G, _ = _mats()
    W = uce_edit(W0, Ce, G, None, lam=1e-8)
    torch.testing.assert_close(W @ Ce.T, W0 @ G.T, rtol=1e-6, atol=1e-6)
    assert W.dtype == F64
    # empty (0 x d_in) preserve set is the same as None
    torch.testing.assert_close(uce_edit(W0, Ce, G, Ce.new_zeros(0, 16), lam=1e-8), W)


def test_uce_preserve_rows_kept():
    W0, Ce, G, Cp = _mats()
    W = uce_edit(W0, Ce, G, Cp, lam=1e-6, preserve_scale=1e4)
    rel = (W @ Cp.T - W0 @ Cp.T).norm() / (W0 @ Cp.T).norm()
    assert rel < 1e-6
    # erasure still holds (erase and preserve rows are independent, 7 < 16 rows)
    torch.testing.assert_close(W @ Ce.T, W0 @ G.T, rtol=1e-5, atol=1e-5)


def test_uce_huge_lambda_is_identity_and_float32_io():
    W0, Ce, G, Cp = _mats()
    W = uce_edit(W0, Ce, G, Cp, lam=1e9)
    assert (W - W0).norm() / W0.norm() < 1e-6
    W32 = uce_edit(W0.float(), Ce.float(), G.float(), Cp.float(), lam=0.5, dtype=F64)
    assert W32.dtype == torch.float32
    torch.testing.assert_close(W32.double(), uce_edit(W0, Ce, G, Cp, lam=0.5), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        uce_edit(W0, Ce, G[:2], Cp)


def test_align_guide_rows():
    e = torch.arange(5.0).unsqueeze(1)  # 4 content tokens + EOS
    g = 10 + torch.arange(3.0).unsqueeze(1)  # 2 content tokens + EOS
    assert align_guide_rows(e, g).flatten().tolist() == [10, 11, 12, 12, 12]
    assert align_guide_rows(g, e).flatten().tolist() == [0, 1, 4]  # longer guide truncated, EOS kept
    assert align_guide_rows(e, g[-1:]).flatten().tolist() == [12] * 5  # empty guide prompt


def test_eos_positions():
    ids = torch.tensor([[0, 5, 6, 1, 1], [0, 1, 1, 1, 1], [1, 7, 1, 1, 1], [0, 5, 6, 7, 8]])
    assert eos_positions(ids, 1).tolist() == [3, 1, 2, 4]


# ---------------------------------------------------------------- tiny offline Stable Diffusion pipeline
WORDS = ["a", "an", "photo", "of", "cat", "dog", "artwork", "van", "gogh", "monet", "painting"]


def _tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = []

    def add(tok):
        vocab.setdefault(tok, len(vocab))

    for ch in string.ascii_lowercase:  # single letters so unknown words still tokenize
        add(ch)
        add(ch + "</w>")
    # Merge letter by letter into whole-word tokens; longest words first so that a short word's merge
    # (e.g. "a n</w>" of "an") cannot outrank and split a longer word ("van").
    for w in sorted(WORDS, key=len, reverse=True):
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            merges.append((cur, p))
            cur += p
            add(cur)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)


@pytest.fixture(scope="module")
def tiny_pipe():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = _tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=len(tok), max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    ).eval()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32,), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def test_encode_prompt_tokens_matches_pipeline(tiny_pipe):
    rows = encode_prompt_tokens(tiny_pipe, ["a photo of a cat", "van gogh", ""])
    assert [r.shape[0] for r in rows] == [7, 4, 2]  # BOS + tokens + EOS
    full = tiny_pipe.encode_prompt("a photo of a cat", "cpu", 1, False)[0][0]
    torch.testing.assert_close(rows[0], full[:7])
    torch.testing.assert_close(rows[0][:4], encode_prompt_tokens(tiny_pipe, "a photo of a dog")[0][:4])  # causal


def test_erase_concepts_on_tiny_pipeline(tiny_pipe):
    unet = tiny_pipe.unet
    kv = {n: m.weight.detach().clone() for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    erase, preserve = ["van gogh"], ["a photo of a cat", "monet painting"]
    with torch.no_grad():
        e_rows = encode_prompt_tokens(tiny_pipe, erase)[0][1:].double()
        g_rows = encode_prompt_tokens(tiny_pipe, "")[0][1:].double()
        p_rows = torch.cat([t[1:] for t in encode_prompt_tokens(tiny_pipe, preserve)]).double()

    with pytest.raises(ValueError, match="empty"):
        erase_concepts(tiny_pipe, [], "", preserve)
    with pytest.raises(ValueError, match="guide"):
        erase_concepts(tiny_pipe, erase, ["", ""], preserve)

    info = erase_concepts(tiny_pipe, erase, "", preserve, lam=1e-4, preserve_scale=10.0, dtype=F64,
                          token_positions="concept")  # the rows after BOS (reference rows: test_sd_path.py)
    assert info["layers_edited"] == len(kv) == 8  # 4 cross-attention blocks x (K, V)
    assert info["erase_rows"] == 3 and info["preserve_rows"] == 9
    mods = dict(unet.named_modules())
    for name, W0 in kv.items():
        W, W0 = mods[name].weight.detach().double(), W0.double()
        target = (W0 @ g_rows[-1:].T).expand(-1, 3)  # empty guide: every erase row -> the empty prompt's EOS
        err_erase = (W @ e_rows.T - target).norm() / target.norm()
        err_keep = (W @ p_rows.T - W0 @ p_rows.T).norm() / (W0 @ p_rows.T).norm()
        moved = (W0 @ e_rows.T - target).norm() / target.norm()
        assert moved > 0.1, (name, moved)  # the edit had something to do (measured ~1.0)
        assert err_erase < 1e-3, (name, err_erase)  # measured ~2e-5 at lam 1e-4
        assert err_keep < 1e-4, (name, err_keep)  # measured ~1e-6
