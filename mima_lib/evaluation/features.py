"""Image feature extractors for SGR/MSGR, behind one small interface.

Every extractor has a `name` and `similarity(a_images, b_images) -> (A, B)` tensor (higher = more alike).
Embedding extractors also have `embed(images) -> (B, D)` L2-normalised features; their similarity is cosine.

- `ClipExtractor`  CLIP image embeddings (default `openai/clip-vit-base-patch32`), plus `clip_score` to a prompt.
- `DinoExtractor`  DINO ViT CLS features (default `facebook/dino-vits16`; DINOv2 folders work too).
- `LpipsExtractor` 1 - LPIPS (AlexNet) through the optional `lpips` package (needs torchvision).

The toy world's oracle (`mima_lib.toy.oracle.OracleExtractor`) has the same interface.

Images are PIL images or (B,3,H,W) tensors in [-1, 1], as `diffusion.generate` returns them. Weights load with
transformers' `from_pretrained` from a hub id or a local folder; when they cannot be found the error names the
weights and how to get them. Nothing ever falls back silently to another extractor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ..method.diffusion import images_to_tensor, tensor_to_images

CLIP_DEFAULT = "openai/clip-vit-base-patch32"
DINO_DEFAULT = "facebook/dino-vits16"


class MissingWeightsError(RuntimeError):
    """The weights of a feature extractor could not be found (offline, not downloaded, wrong path)."""


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str

    def similarity(self, a_images, b_images) -> torch.Tensor:
        """(A, B) similarity of every image of a to every image of b; higher = more alike."""
        ...


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _download_hint(model: str, what: str) -> str:
    return (f"{what} {model!r} could not be loaded: not in the local Hugging Face cache, and the hub is "
            f"unreachable (or HF_HUB_OFFLINE=1 is set). Where the hub is reachable run `hf download {model}` "
            f"(older hubs: `huggingface-cli download {model}`) to fill the cache, or "
            f"`hf download {model} --local-dir DIR` and pass DIR as the extractor's path.")


def load_pretrained(loader, model: str, what: str, **kwargs):
    """Call `loader.from_pretrained(model)`, turning missing-weights errors into one clear MissingWeightsError."""
    if _looks_like_path(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist; give a folder written by "
                                    f"save_pretrained or a hub id such as {CLIP_DEFAULT!r}")
        model = str(folder)
    try:
        return loader.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as err:
        if Path(model).is_dir():
            raise MissingWeightsError(f"{what} folder {model!r} is incomplete ({err}); re-save it with "
                                      "save_pretrained (model and image processor)") from err
        if isinstance(err, ValueError):
            raise
        raise MissingWeightsError(f"{_download_hint(model, what)} Original error: {err}") from err


def _as_pil(images) -> list:
    return tensor_to_images(images) if isinstance(images, torch.Tensor) else list(images)


def _vector(out) -> torch.Tensor:
    """transformers 5 returns ModelOutput from get_*_features (vector in .pooler_output); 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class EmbeddingExtractor:
    """Base class: cosine similarity of L2-normalised embeddings."""

    name = "embedding"

    def embed(self, images) -> torch.Tensor:
        raise NotImplementedError

    def similarity(self, a_images, b_images) -> torch.Tensor:
        return self.embed(a_images) @ self.embed(b_images).T


class _HFImageExtractor(EmbeddingExtractor):
    """Shared loading and batching for transformers vision models."""

    what = "model"

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 64):
        from transformers import AutoImageProcessor

        self.model_name, self.device, self.batch_size = str(model), device, batch_size
        self.model = self._load_model(self.model_name).to(device).eval()
        self.processor = load_pretrained(AutoImageProcessor, self.model_name, f"{self.what} image processor")

    def _load_model(self, model: str):
        raise NotImplementedError

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        pil = _as_pil(images)
        out = []
        for i in range(0, len(pil), self.batch_size):
            pix = self.processor(images=pil[i:i + self.batch_size], return_tensors="pt").pixel_values
            out.append(self._features(pix.to(self.device, self.model.dtype)).float().cpu())
        return F.normalize(torch.cat(out), dim=1)


class ClipExtractor(_HFImageExtractor):
    """CLIP image embeddings (projected, normalised); `clip_score` compares images to prompts."""

    what = "CLIP"

    def __init__(self, model: str = CLIP_DEFAULT, device: str = "cpu", batch_size: int = 64):
        super().__init__(model, device, batch_size)
        self.name = "clip"
        self._tokenizer = None

    def _load_model(self, model):
        from transformers import CLIPModel

        return load_pretrained(CLIPModel, model, "CLIP weights")

    def _features(self, pixel_values):
        return _vector(self.model.get_image_features(pixel_values=pixel_values))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = load_pretrained(AutoTokenizer, self.model_name, "CLIP tokenizer")
        return self._tokenizer

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        feats = _vector(self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                                     attention_mask=tok.attention_mask.to(self.device)))
        return F.normalize(feats.float().cpu(), dim=1)

    def clip_score(self, images, prompts: list[str]) -> torch.Tensor:
        """Per-image CLIP score to its own prompt: 100 * max(cos, 0), torchmetrics' convention."""
        if len(prompts) != len(images):
            raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts; give one prompt each")
        cos = (self.embed(images) * self.embed_text(prompts)).sum(1)
        return 100 * cos.clamp(min=0)


class DinoExtractor(_HFImageExtractor):
    """DINO ViT CLS-token features after the final layer norm (DINO v1 as ViTModel, or DINOv2)."""

    what = "DINO"

    def __init__(self, model: str = DINO_DEFAULT, device: str = "cpu", batch_size: int = 64):
        super().__init__(model, device, batch_size)
        self.name = "dino"

    def _load_model(self, model):
        from transformers import AutoConfig, AutoModel, ViTModel

        config = load_pretrained(AutoConfig, model, "DINO weights")
        if config.model_type == "vit":  # DINO v1 checkpoints have no pooler: don't create a random one
            return load_pretrained(ViTModel, model, "DINO weights", add_pooling_layer=False)
        return load_pretrained(AutoModel, model, "DINO weights")

    def _features(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


class LpipsExtractor:
    """1 - LPIPS distance (AlexNet by default) for every pair; needs the optional `lpips` package."""

    def __init__(self, net: str = "alex", device: str = "cpu", batch_size: int = 64):
        try:
            import lpips
        except Exception as err:  # ImportError, or torchvision failing to import beside a CPU torch
            raise ImportError(
                "LPIPS needs the `lpips` package: pip install lpips (needs torchvision matching your torch; it "
                "does not import beside the CPU torch 2.13 wheel, so use LPIPS on a GPU install) or "
                f"`pip install mima-lib[lpips]`. Original error: {err}") from err
        try:
            self.model = lpips.LPIPS(net=net, verbose=False).to(device).eval()
        except OSError as err:  # the backbone comes from torchvision's download cache
            raise MissingWeightsError(f"LPIPS backbone {net!r} (torchvision ImageNet weights) could not be "
                                      f"loaded; run once where downloads work to fill ~/.cache/torch. {err}") from err
        self.name, self.device, self.batch_size = f"lpips_{net}", device, batch_size

    @torch.no_grad()
    def similarity(self, a_images, b_images) -> torch.Tensor:
        a, b = images_to_tensor(a_images).float(), images_to_tensor(b_images).float()
        ia, ib = torch.meshgrid(torch.arange(len(a)), torch.arange(len(b)), indexing="ij")
        ia, ib = ia.flatten(), ib.flatten()
        d = [self.model(a[ia[i:i + self.batch_size]].to(self.device), b[ib[i:i + self.batch_size]].to(self.device))
             .flatten().cpu() for i in range(0, len(ia), self.batch_size)]
        return 1 - torch.cat(d).view(len(a), len(b))


REGISTRY = {"clip": ClipExtractor, "dino": DinoExtractor, "lpips": LpipsExtractor}


def make_extractor(name: str, path=None, **kwargs) -> FeatureExtractor:
    """Build an extractor by name: 'clip', 'dino' or 'lpips' (the toy world's oracle:
    mima_lib.toy.oracle.OracleExtractor).

    path: hub id or local folder for clip/dino (defaults: CLIP ViT-B/32, DINO ViT-S/16); LPIPS backbone name
    ('alex').
    """
    key = name.lower().strip()
    if key not in REGISTRY:
        raise ValueError(f"unknown feature extractor {name!r}; choose one of {sorted(REGISTRY)}")
    if key == "lpips":
        return LpipsExtractor(path or "alex", **kwargs)
    return REGISTRY[key](str(path) if path is not None else
                         (CLIP_DEFAULT if key == "clip" else DINO_DEFAULT), **kwargs)


def clip_score(images, prompts: list[str], extractor: ClipExtractor | None = None) -> torch.Tensor:
    """Per-image CLIP score (100 * max(cos, 0)) of each image to its prompt; default CLIP ViT-B/32."""
    return (extractor or ClipExtractor()).clip_score(images, prompts)
