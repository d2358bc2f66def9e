"""Loading a Stable Diffusion pipeline: a local diffusers folder or a hub id (SD v1-4 on a GPU).

Both go through `StableDiffusionPipeline.from_pretrained`, the loader that serves
`CompVis/stable-diffusion-v1-4`; this module only adds early, clear errors. The embedded toy model is
one such folder (`mima_lib.toy.load_toy_pipeline`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def looks_like_path(name: str) -> bool:
    """A local folder (existing, or written like a path) rather than a hub id such as 'CompVis/sd-v1-4'."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def _check_local_folder(folder: Path) -> None:
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"model folder {folder} has no model_index.json: it is not a diffusers pipeline folder. "
            "Pass a folder written by save_pretrained, a hub id, or 'toy' in a parameter file for the embedded default.")
    missing = [p for p in PIPELINE_PARTS if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"model folder {folder} lacks {missing}; re-save it with pipe.save_pretrained()")


def load_pipeline(model: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  progress: bool = False):
    """Load a StableDiffusionPipeline from a local folder or a hub id; errors name the fix."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = (diffusers_logging.enable_progress_bar, transformers_logging.enable_progress_bar) if progress else \
        (diffusers_logging.disable_progress_bar, transformers_logging.disable_progress_bar)
    for switch in bars:  # loading a toy pipeline takes 0.1 s: its progress bars are noise in notebooks
        switch()
    return _load_pipeline(str(model), dtype, device)


def _load_pipeline(name: str, dtype: torch.dtype, device: str):
    from diffusers import StableDiffusionPipeline

    if name in ("toy", "embedded", "default"):
        raise ValueError(f"{name!r} names the embedded toy model, which lives a layer above the method: load it "
                         "with mima_lib.toy.load_toy_pipeline() (in a parameter file, model: toy works as is)")
    if looks_like_path(name):
        folder = Path(name).expanduser()
        if not folder.exists():
            raise FileNotFoundError(f"model path {folder} does not exist; check the 'model' setting")
        _check_local_folder(folder)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise RuntimeError(f"could not load the pipeline in {folder} (corrupt or incomplete weights?): {err}") \
                from err
        return pipe.to(device)
    try:  # a hub id such as CompVis/stable-diffusion-v1-4
        pipe = StableDiffusionPipeline.from_pretrained(name, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    except OSError as err:
        raise RuntimeError(
            f"could not load {name!r} from the model hub (offline, unknown id, or a gated model?). "
            f"Download it where the hub is reachable (`huggingface-cli download {name}`), then point 'model' at "
            f"the local folder, or use 'toy' for the embedded default. Original error: {err}") from err
    return pipe.to(device)


def device_for(requested: str = "auto") -> str:
    """'auto' -> cuda if present else cpu; asking for cuda without a GPU fails clearly."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} asked for, but no CUDA GPU is visible; set device: cpu")
    return requested
