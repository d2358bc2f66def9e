"""Stage 01, data: every concept's immunization, attack and reference images, and the regularization images.

Toy world: renders (the attacker holds real photos) or the base model's own generations; a real model: its
generations before erasure (the paper's re-learning data), or the user's folders (data.image_root).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ...attacks.data import load_concept_folder, write_concept_folder
from ...evaluation.plots import image_grid
from ...method.diffusion import generate, tensor_to_images
from ...method.tensor_io import atomic_write_text
from ..artifacts import MANIFEST, atomic_folder, remove_stale_temporaries, write_manifest
from ..config import ExperimentConfig, slug, stage_settings
from .common import base_pipeline, log, must_run


def regularization_prompts(cfg: ExperimentConfig) -> list[str]:
    """The prior's prompts: the generic prompt(s) of the targets' kinds (or the file's), then
    data.regularization_concepts' own prompts."""
    if cfg.data.regularization_prompt is not None:
        generic = [cfg.data.regularization_prompt]
    else:
        generic = sorted({cfg.concept(c).generic_prompt for c in cfg.concepts})
    return generic + [cfg.concept(c).prompt for c in cfg.data.regularization_concepts]


@dataclass
class DataResult:
    cfg: ExperimentConfig
    folder: Path
    images: dict = field(default_factory=dict)  # concept -> {'immunize'|'attack'|'reference': [PIL]}
    regularization: dict = field(default_factory=dict)  # prompt -> [PIL]

    def summary(self) -> None:
        for c, parts in self.images.items():
            log(f"{c:>20s}: " + ", ".join(f"{k} {len(v)}" for k, v in parts.items()))
        for p, ims in self.regularization.items():
            log(f"{'regularization':>20s}: {len(ims)} images of {p!r}")


def _concept_images(cfg: ExperimentConfig, pipe, name: str, k: int) -> dict:
    """Immunization, attack and reference images of one concept (see 01_data)."""
    d, concept = cfg.data, cfg.concept(name)
    prompt = concept.prompt
    if cfg.data.image_root is not None:  # the user's images: split into immunize / attack
        loaded = load_concept_folder(Path(cfg.data.image_root).expanduser() / slug(name), resize=True,
                                     size=pipe.unet.config.sample_size * pipe.vae_scale_factor).images
        need = d.immunization_images + d.attack_images
        if len(loaded) < need:
            raise ValueError(f"concept {name!r}: {len(loaded)} images in data.image_root, need {need} "
                             "(immunization_images + attack_images)")
        return {"immunize": loaded[:d.immunization_images], "attack": loaded[d.immunization_images:need],
                "reference": loaded[d.immunization_images:need]}
    # personalization: new concepts, the renderer is the only source; toy source 'render': the attacker's
    # real photos (and the defender's) are renders, disjoint seeds, drawn anew for each experiment seed; a
    # harmless fine-tune's concept is one the base model never saw: its images are renders too
    benign = name in cfg.evaluate.benign_concepts
    if cfg.task == "personalization" or (concept.toy and (d.source == "render" or benign)):
        from ...toy import world

        draw = 100_000 * cfg.seed
        return {"immunize": world.render_many(name, d.immunization_images, 40_000 + draw),
                "attack": world.render_many(name, d.attack_images, 20_000 + draw),
                "reference": world.render_many(name, d.reference_images, 30_000 + draw)}
    base = 1_000_000 + 10_000 * k + cfg.seed * 1000  # disjoint generation seeds per concept
    n_imm, n_att = d.immunization_images, d.attack_images
    ims = tensor_to_images(generate(pipe, [prompt] * (n_imm + n_att), list(range(base, base + n_imm + n_att)),
                                    d.sample_steps, d.guidance, d.batch_size))
    # references: the renderer's ground truth on the toy world; a real model's own pre-erasure images otherwise
    if cfg.is_toy and concept.toy:
        from ...toy import world

        ref = world.render_many(name, d.reference_images, 30_000)
    else:
        ref = ims[n_imm:]
    return {"immunize": ims[:n_imm], "attack": ims[n_imm:], "reference": ref}


PART_DONE = ".complete.json"  # hidden: load_concept_folder and the stage manifest's file list skip it
PARTS = ("immunize", "attack", "reference")


def _part_record(settings: dict, key: str) -> dict:
    return json.loads(json.dumps({"part": key, "settings": settings}, sort_keys=True, default=str))


def _part_done(folder: Path, settings: dict, key: str) -> bool:
    """True if folder was written completely by a data stage with these settings (its marker matches)."""
    try:
        record = json.loads((folder / PART_DONE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False
    if {k: record.get(k) for k in ("part", "settings")} != _part_record(settings, key):
        return False  # made by a run with other settings that never finished: redo it
    return all((folder / f).is_file() for f in record.get("files", []))


def _write_part(folder: Path, images: list, prompt: str, settings: dict, key: str) -> None:
    """Write one part (images + metadata.csv) atomically; its marker, inside, says that it is complete."""
    with atomic_folder(folder) as tmp:
        write_concept_folder(tmp, images, prompt, overwrite=True)
        files = sorted(p.name for p in tmp.iterdir())
        atomic_write_text(tmp / PART_DONE, json.dumps({**_part_record(settings, key), "files": files},
                                                      indent=1, sort_keys=True))


def make_data(cfg: ExperimentConfig, run_dir: Path, force: bool = False) -> DataResult:
    """Generate (or load) the concepts' and the regularization images.

    Resumable: every part folder (<concept>/<part>, regularization/<prompt>) is written atomically with a
    hidden completion marker; a run killed midway and restarted skips the complete parts and redoes the rest.
    Generation depends only on (prompt, seed), so the result is byte-identical to an uninterrupted run.
    """
    folder = Path(run_dir) / "data"
    settings = stage_settings(cfg, "data")
    if must_run(folder, settings, force):
        remove_stale_temporaries(folder)
        if force:  # forget the finished stage and its parts, so that a killed forced run resumes as one
            (folder / MANIFEST).unlink(missing_ok=True)
            for marker in folder.rglob(PART_DONE):
                marker.unlink()
        pipe, skipped = None, []
        for k, name in enumerate(cfg.concepts + cfg.evaluate.benign_concepts):
            keys = {part: f"{slug(name)}/{part}" for part in PARTS}
            todo = [part for part in PARTS if not _part_done(folder / keys[part], settings, keys[part])]
            skipped += [keys[part] for part in PARTS if part not in todo]
            if not todo:
                continue
            if pipe is None:
                log("generating data with the base model")
                pipe = base_pipeline(cfg)
            for part, ims in _concept_images(cfg, pipe, name, k).items():
                if part in todo:
                    _write_part(folder / keys[part], ims, cfg.concept(name).attack_prompt, settings, keys[part])
        prompts = regularization_prompts(cfg)
        for j, p in enumerate(prompts):
            key = f"regularization/{slug(p)}"
            if _part_done(folder / key, settings, key):
                skipped.append(key)
                continue
            n = cfg.data.regularization_images // len(prompts)
            first = 2_000_000 + 10_000 * j + 1_000_000 * cfg.seed  # a new draw per experiment seed
            seeds = list(range(first, first + n))
            if n and pipe is None:
                log("generating regularization data with the base model")
                pipe = base_pipeline(cfg)
            ims = tensor_to_images(generate(pipe, [p] * n, seeds, cfg.data.sample_steps, cfg.data.guidance,
                                            cfg.data.batch_size)) if n else []
            _write_part(folder / key, ims, p, settings, key)
        if skipped:
            log(f"resumed: {len(skipped)} part(s) were already complete ({', '.join(skipped)})")
        write_manifest(folder, settings, cfg.seed)
    return load_data(cfg, run_dir)


def load_data(cfg: ExperimentConfig, run_dir: Path) -> DataResult:
    folder = Path(run_dir) / "data"
    res = DataResult(cfg, folder)
    for name in cfg.concepts + cfg.evaluate.benign_concepts:
        res.images[name] = {part: load_concept_folder(folder / slug(name) / part).images
                            for part in ("immunize", "attack", "reference")}
    for p in regularization_prompts(cfg):
        sub = folder / "regularization" / slug(p)
        res.regularization[p] = load_concept_folder(sub).images if any(sub.glob("*.png")) else []
    return res


def show_data(data: DataResult, per_part: int = 6):
    images, labels = [], []
    for c, parts in data.images.items():
        images += parts["immunize"][:per_part] + parts["attack"][:per_part]
        labels.append(c)
    return image_grid(images, len(labels), 2 * per_part, labels=labels)
