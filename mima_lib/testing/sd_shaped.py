"""Random-weight pipelines with Stable Diffusion v1-4's shape, built locally with no download: the real-model
code paths are proven on them (the toy model makes every concept word one token, 16 positions, 128-d states).

    python -m mima_lib.testing.sd_shaped OUT                # tiny widths: SD's layout, 77 tokens, 768-d, 64 px
    python -m mima_lib.testing.sd_shaped OUT --size full    # SD v1-4's real component sizes, 512 px (a GPU's job)
    python -m mima_lib.testing.sd_shaped OUT --evaluators   # also tiny random CLIP and DINO models for SGR

What is real: the CLIP BPE tokenizer (its vocabulary read from the `clip-anytorch` wheel, MIT, installed with
`--no-deps` as a test dependency; ids equal SD v1-4's: "a photo of" = 320 1125 539, "Kelly McKernan" is three
tokens, "<new1>" four), 77 positions padded with EOS, 768-d text states, SD's UNet block layout
(CrossAttnDown x3 + Down, Up + CrossAttnUp x3), a 4-level VAE (factor 8) and SD's PNDM noise schedule.
What is not: every weight (random), and at `--size tiny` the channel widths and layer counts.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
from pathlib import Path

import torch

from ..toy.text import byte_level_alphabet  # GPT-2/CLIP's byte-to-unicode table

SD14_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
SIZES = {  # full = SD v1-4's component configs
    "tiny": dict(image=64, unet=(32, 32, 64, 64), layers=1, heads=8, vae=(16, 32, 32, 32), vae_groups=16,
                 text_layers=1, text_ffn=512, text_heads=12),
    "full": dict(image=512, unet=(320, 640, 1280, 1280), layers=2, heads=8, vae=(128, 256, 512, 512), vae_groups=32,
                 text_layers=12, text_ffn=3072, text_heads=12),
}


def clip_bpe_file() -> Path:
    """The CLIP BPE merges shipped in the clip-anytorch wheel (installed without its dependencies)."""
    spec = importlib.util.find_spec("clip")  # finds the package without importing it (it needs torchvision)
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz" if spec else None
    if path is None or not path.exists():
        raise FileNotFoundError("the CLIP vocabulary is missing: `pip install --no-deps clip-anytorch==2.6.0` "
                                "(the README's test set-up does it)")
    return path


def clip_tokenizer(folder: Path):
    """SD v1-4's CLIPTokenizer rebuilt from the BPE file, as CLIP's SimpleTokenizer builds its vocabulary."""
    from transformers import CLIPTokenizer

    merges = gzip.open(clip_bpe_file()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = byte_level_alphabet()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    return tok


def build_pipeline(size: str = "tiny", seed: int = 0, tokenizer_dir: Path | None = None):
    """A StableDiffusionPipeline with SD v1-4's layout and random weights (see the module docstring)."""
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    s = SIZES[size]
    torch.manual_seed(seed)
    tok = clip_tokenizer(tokenizer_dir or Path(tempfile.mkdtemp()) / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=s["text_ffn"],
                                        num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
                                        max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                        projection_dim=768, hidden_act="quick_gelu"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=s["vae"],
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2 if size == "full" else 1, norm_num_groups=s["vae_groups"],
                        sample_size=s["image"], scaling_factor=0.18215)
    unet = UNet2DConditionModel(
        sample_size=s["image"] // 8, in_channels=4, out_channels=4, layers_per_block=s["layers"],
        block_out_channels=s["unet"], cross_attention_dim=768, attention_head_dim=s["heads"],
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=32 if size == "full" else 16)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=PNDMScheduler(**SD14_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def save_pipeline(folder: Path, size: str = "tiny", seed: int = 0) -> Path:
    folder = Path(folder)
    pipe = build_pipeline(size, seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_evaluators(folder: Path, seed: int = 0) -> dict[str, str]:
    """Tiny random CLIP and DINO (ViT) models with their image processors: {'clip': dir, 'dino': dir}."""
    from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, ViTConfig, ViTModel)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = clip_tokenizer(folder / "clip")
    clip = CLIPModel(CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=77).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8).to_dict(),
        projection_dim=32))
    clip.save_pretrained(folder / "clip")
    tok.save_pretrained(folder / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder / "clip")
    dino = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8), add_pooling_layer=False)
    dino.save_pretrained(folder / "dino")
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder / "dino")
    return {"clip": str(folder / "clip"), "dino": str(folder / "dino")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--evaluators", action="store_true", help="also write tiny random CLIP and DINO under OUT/eval")
    args = ap.parse_args(argv)
    print(f"SD-shaped pipeline ({args.size}): {save_pipeline(Path(args.out), args.size, args.seed)}")
    if args.evaluators:
        print(json.dumps(save_evaluators(Path(args.out) / "eval", args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
