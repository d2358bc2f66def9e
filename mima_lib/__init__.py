"""mima: multi-concept model immunization of text-to-image diffusion models (MIMA, AAAI 2025).

The layers, each importing only those below it:

    method/      UCE erasure, Custom Diffusion's merge, MIMA's bi-level immunization and its hypergradient,
                 parameter sets, the diffusion loss, the one training loop
    attacks/     LoRA, DreamBooth, Textual Inversion, Custom Diffusion; the attacker's image folders
    evaluation/  CLIP / DINO / LPIPS features, SGR / MSGR with confidence intervals, tables and pictures
    toy/         the toy world, its tiny Stable-Diffusion-shaped model and oracle (the embedded default)
    experiment/  parameter files, concept records, the notebook stages, the papermill runner, the demo

The short public API below is imported on first use, so `import mima_lib` stays light.
"""

__version__ = "0.1.0"

_API = {
    "load_pipeline": "method.pipeline", "device_for": "method.pipeline",
    "erase_concepts": "method.erase", "uce_edit": "method.erase",
    "merge_cross_attention": "method.merge", "merge_projection": "method.merge",
    "immunize": "method.immunize", "ImmunizeConfig": "method.immunize", "save_immunized": "method.immunize",
    "load_immunized": "method.immunize", "attack_losses": "method.bilevel",
    "TrainConfig": "method.training", "train": "method.training", "generate": "method.diffusion",
    "GENERIC_CAPTIONS": "method.captions", "generic_captions": "method.captions",
    "run_attack": "attacks", "make_settings": "attacks", "save_attack": "attacks", "load_attack": "attacks",
    "load_concept_folder": "attacks.data", "write_concept_folder": "attacks.data",
    "make_extractor": "evaluation.features", "sgr_table": "evaluation.metrics", "msgr": "evaluation.metrics",
    "sgr": "evaluation.metrics", "confidence_interval": "evaluation.metrics", "image_grid": "evaluation.plots",
    "paired_difference": "evaluation.metrics", "steps_to_relearn": "evaluation.metrics",
    "load_toy_pipeline": "toy.model", "load_toy_oracle": "toy.oracle",
    "load_experiment": "experiment.loading", "run_sequence": "experiment.run",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mima_lib' has no attribute {name!r}")
