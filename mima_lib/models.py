"""Loading pipelines: the embedded toy model, a local diffusers folder, or a hub id (SD v1-4 on a GPU).

All three go through `StableDiffusionPipeline.from_pretrained`, the loader that serves
`CompVis/stable-diffusion-v1-4`; this module only adds early, clear errors.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
TOY_MODEL = ASSETS / "toy_sd"
TOY_ORACLE = ASSETS / "toy_oracle"
EMBEDDED = ("toy", "embedded", "default")
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _check_local_folder(folder: Path) -> None:
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"model folder {folder} has no model_index.json: it is not a diffusers pipeline folder. "
            "Pass 'toy' for the embedded default, a folder written by save_pretrained, or a hub id.")
    missing = [p for p in PIPELINE_PARTS if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"model folder {folder} lacks {missing}; re-save it with pipe.save_pretrained()")


def load_pipeline(model: str | os.PathLike = "toy", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a StableDiffusionPipeline by name ('toy'), local folder, or hub id; errors name the fix."""
    from diffusers import StableDiffusionPipeline

    name = str(model)
    if name in EMBEDDED:
        folder = TOY_MODEL
        if not folder.exists():
            raise FileNotFoundError(f"the embedded toy model is missing at {folder}; rebuild it with "
                                    "`python -m mima_lib.build_toy` or restore it from git")
    elif os.path.sep in name and not Path(name).exists() or name.startswith((".", "/", "~")):
        folder = Path(name).expanduser()
        if not folder.exists():
            raise FileNotFoundError(f"model path {folder} does not exist; check the 'model' setting")
    elif Path(name).exists():
        folder = Path(name)
    else:
        folder = None
    if folder is not None:
        _check_local_folder(folder)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise RuntimeError(f"could not load the pipeline in {folder} (corrupt or incomplete weights?): {err}") \
                from err
        return pipe.to(device)
    try:  # a hub id such as CompVis/stable-diffusion-v1-4
        pipe = StableDiffusionPipeline.from_pretrained(name, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    except OSError as err:
        raise RuntimeError(
            f"could not load {name!r} from the model hub (offline, unknown id, or a gated model?). "
            f"Download it where the hub is reachable (`huggingface-cli download {name}`), then point 'model' at "
            f"the local folder, or use 'toy' for the embedded default. Original error: {err}") from err
    return pipe.to(device)


def load_toy_oracle():
    from .oracle import ToyOracle

    return ToyOracle.load(TOY_ORACLE)


def device_for(requested: str = "auto") -> str:
    """'auto' -> cuda if present else cpu; asking for cuda without a GPU fails clearly."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} asked for, but no CUDA GPU is visible; set device: cpu")
    return requested
