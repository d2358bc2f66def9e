"""The experiment's stages, one function per notebook, each reading and writing one run folder.

    runs/<experiment>/data/<concept>/{immunize,attack,reference}/   01: images + metadata.csv
    runs/<experiment>/data/regularization/<prompt>/                  01: prior / merge regularization images
    runs/<experiment>/erased/                                        02: UCE-edited K/V weights
    runs/<experiment>/immunized/<method>/                            03: changed parameters + settings
    runs/<experiment>/attacks/<model>/<concept>/<attack>/seed<k>/    04/05: snapshots + losses
    runs/<experiment>/report/                                        06: tables and figures

A stage whose folder holds a manifest made with the same settings is skipped (force=True redoes it);
one made with other settings is refused. Notebooks only call these functions and show their pictures.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import toyworld
from .artifacts import (MANIFEST, apply_unet_params, atomic_folder, atomic_write_text, check_manifest, load_tensors,
                        remove_stale_temporaries, save_tensors, write_manifest)
from .attack_data import load_concept_folder, personalization_prompt, write_concept_folder
from .diffusion import generate, image_grid, tensor_to_images
from .experiment import ExperimentConfig, concept_prompt, slug
from .models import device_for, load_pipeline

GENERIC = {"artist": toyworld.GENERIC_ARTWORK_PROMPT, "object": toyworld.GENERIC_OBJECT_PROMPT,
           "instance": toyworld.GENERIC_OBJECT_PROMPT}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _kind(cfg: ExperimentConfig, name: str) -> str:
    if name in cfg.prompts:
        return "artist" if "art" in cfg.prompts[name] else "object"
    return toyworld.concept(name).kind


def attack_prompt(cfg: ExperimentConfig, name: str) -> str:
    """Re-learning: the concept's own prompt. Personalization: a modifier token and the class word."""
    if cfg.task == "personalization" and name not in cfg.prompts:
        return personalization_prompt(name)
    return concept_prompt(cfg, name)


def regularization_prompts(cfg: ExperimentConfig) -> list[str]:
    """The prior's prompts: the generic class prompt(s) (or the file's), then data.regularization_concepts'."""
    if cfg.data.regularization_prompt is not None:
        generic = [cfg.data.regularization_prompt]
    else:
        generic = sorted({GENERIC[_kind(cfg, c)] for c in cfg.concepts})
    return generic + [concept_prompt(cfg, c) for c in cfg.data.regularization_concepts]


def _fresh(folder: Path, settings: dict, force: bool) -> bool:
    """True if the stage in folder must (re)run."""
    if force:
        return True
    return not check_manifest(folder, settings)


def _settings(cfg: ExperimentConfig, *sections: str) -> dict:
    d = asdict(cfg)
    d["erase"]["lam"] = erase_lam(cfg)  # the value used, so a changed default invalidates old outputs
    keep = {"model", "seed", "task", "concepts", "prompts", *sections}
    return {k: v for k, v in d.items() if k in keep}


def base_pipeline(cfg: ExperimentConfig):
    return load_pipeline(cfg.model, device=device_for(cfg.device))


# ------------------------------------------------------------------------------------------- 01 data
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
    d, prompt = cfg.data, concept_prompt(cfg, name)
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
    # real photos (and the defender's) are renders, disjoint seeds
    if cfg.task == "personalization" or (cfg.is_toy and d.source == "render" and name not in cfg.prompts):
        return {"immunize": toyworld.render_many(name, d.immunization_images, 40_000),
                "attack": toyworld.render_many(name, d.attack_images, 20_000),
                "reference": toyworld.render_many(name, d.reference_images, 30_000)}
    base = 1_000_000 + 10_000 * k + cfg.seed * 1000  # disjoint generation seeds per concept
    n_imm, n_att = d.immunization_images, d.attack_images
    ims = tensor_to_images(generate(pipe, [prompt] * (n_imm + n_att), list(range(base, base + n_imm + n_att)),
                                    d.sample_steps, d.guidance, d.batch_size))
    # references: the renderer's ground truth on the toy world; a real model's own pre-erasure images otherwise
    ref = toyworld.render_many(name, d.reference_images, 30_000) if cfg.is_toy and name not in cfg.prompts \
        else ims[n_imm:]
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
    settings = _settings(cfg, "data")
    if _fresh(folder, settings, force):
        remove_stale_temporaries(folder)
        if force:  # forget the finished stage and its parts, so that a killed forced run resumes as one
            (folder / MANIFEST).unlink(missing_ok=True)
            for marker in folder.rglob(PART_DONE):
                marker.unlink()
        pipe, skipped = None, []
        for k, name in enumerate(cfg.concepts):
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
                    _write_part(folder / keys[part], ims, attack_prompt(cfg, name), settings, keys[part])
        prompts = regularization_prompts(cfg)
        for j, p in enumerate(prompts):
            key = f"regularization/{slug(p)}"
            if _part_done(folder / key, settings, key):
                skipped.append(key)
                continue
            n = cfg.data.regularization_images // len(prompts)
            seeds = list(range(2_000_000 + 10_000 * j, 2_000_000 + 10_000 * j + n))
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
    for name in cfg.concepts:
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
    return image_grid(images, len(labels), 2 * per_part, scale=3, labels=labels)


# ---------------------------------------------------------------------------------------- 02 erasure
@dataclass
class EraseResult:
    cfg: ExperimentConfig
    folder: Path
    info: dict
    before: torch.Tensor | None = None
    after: torch.Tensor | None = None

    def summary(self) -> None:
        if not self.info.get("enabled", True):
            log("erasure disabled: later stages start from the base model")
            return
        log(f"UCE edited {self.info['layers_edited']} cross-attention K/V layers (lam {erase_lam(self.cfg)})")
        for c, acc in self.info.get("oracle_accuracy", {}).items():
            log(f"{c:>20s}: oracle accuracy {acc['before']:.0%} -> {acc['after']:.0%}")


def erase_lam(cfg: ExperimentConfig) -> float:
    """The UCE ridge: the file's, else the paper's 0.5 on a real model and the toy's measured value."""
    from .erase import PAPER_LAM, TOY_LAM

    if cfg.erase.lam is not None:
        return cfg.erase.lam
    return TOY_LAM if cfg.is_toy else PAPER_LAM


def erase_settings(cfg: ExperimentConfig) -> dict:
    return _settings(cfg, "erase")


def erase(cfg: ExperimentConfig, run_dir: Path, force: bool = False, n_show: int = 8) -> EraseResult:
    """UCE-erase the target concepts toward their guide prompt; write only the changed K/V weights."""
    from .erase import erase_concepts

    folder = Path(run_dir) / "erased"
    if cfg.task == "personalization" or not cfg.erase.enabled:
        return EraseResult(cfg, folder, {"enabled": False})
    settings = erase_settings(cfg)
    if _fresh(folder, settings, force):
        remove_stale_temporaries(folder)  # what a killed earlier try left
        pipe = base_pipeline(cfg)
        prompts = [concept_prompt(cfg, c) for c in cfg.concepts]
        seeds = [s for _ in prompts for s in range(n_show)]
        show = [p for p in prompts for _ in range(n_show)]
        before = generate(pipe, show, seeds)
        guides = [cfg.erase.guide if cfg.erase.guide is not None else GENERIC[_kind(cfg, c)] for c in cfg.concepts]
        preserve = cfg.erase.preserve or ([c.prompt for c in toyworld.all_concepts()
                                           if c.kind != "instance" and c.name not in cfg.concepts
                                           and c.name not in toyworld.HELDOUT_OBJECTS + toyworld.HELDOUT_ARTISTS]
                                          if cfg.is_toy else [])
        preserve = [concept_prompt(cfg, p) if p in cfg.prompts else p for p in preserve]
        info = erase_concepts(pipe, prompts, guides, preserve, lam=erase_lam(cfg),
                              preserve_scale=cfg.erase.preserve_scale, token_positions=cfg.erase.token_positions)
        changed = {f"{n}.weight": m.weight for n, m in pipe.unet.named_modules()
                   if n in set(info["layer_names"])}
        save_tensors(changed, folder / "erased.safetensors", {"format": "mima-erased/1"})
        after = generate(pipe, show, seeds)
        summary = {"enabled": True, "layers_edited": info["layers_edited"], "guides": guides,
                   "preserve": preserve}
        if cfg.is_toy:
            from .models import load_toy_oracle

            oracle = load_toy_oracle()
            summary["oracle_accuracy"] = {
                c: {"before": oracle.accuracy(before[i * n_show:(i + 1) * n_show], c),
                    "after": oracle.accuracy(after[i * n_show:(i + 1) * n_show], c)} for i, c in enumerate(cfg.concepts)}
        save_tensors({"before": before, "after": after}, folder / "preview.safetensors")
        (folder / "erase.json").write_text(json.dumps(summary, indent=1))
        write_manifest(folder, settings, cfg.seed)
    preview = load_tensors(folder / "preview.safetensors")
    return EraseResult(cfg, folder, json.loads((folder / "erase.json").read_text()), preview["before"],
                       preview["after"])


def show_erasure(res: EraseResult):
    if res.before is None:
        return None
    n = len(res.before) // len(res.cfg.concepts)
    rows = [torch.cat([res.before[i * n:(i + 1) * n], res.after[i * n:(i + 1) * n]]) for i in range(len(res.cfg.concepts))]
    return image_grid(torch.cat(rows), len(rows), 2 * n, scale=3, labels=list(res.cfg.concepts))


def starting_pipeline(cfg: ExperimentConfig, run_dir: Path):
    """The model immunization starts from: the base model, UCE-erased for the re-learning task."""
    pipe = base_pipeline(cfg)
    weights = Path(run_dir) / "erased" / "erased.safetensors"
    if cfg.task == "relearning" and cfg.erase.enabled:
        if not weights.exists():
            raise FileNotFoundError(f"{weights} is missing: run 02_erasure first")
        apply_unet_params(pipe.unet, load_tensors(weights))
    return pipe


def model_for(cfg: ExperimentConfig, run_dir: Path, method: str):
    """'no defense' (erased only) or an immunization method's model."""
    pipe = starting_pipeline(cfg, run_dir)
    if method != "no defense":
        from .immunize import load_immunized

        load_immunized(pipe, Path(run_dir) / "immunized" / slug(method))
    return pipe


# ----------------------------------------------------------------------------------- 03 immunization
@dataclass
class ImmunizeStageResult:
    cfg: ExperimentConfig
    folder: Path
    runs: dict  # method -> immunize.json content (+ losses)

    def summary(self) -> None:
        for m, info in self.runs.items():
            ex = info.get("final_extras", {})
            log(f"{m:>16s}: {info['steps_run']} steps, {info['seconds_per_step']:.2f} s/step, "
                f"final upper loss {ex.get('target', float('nan')):.4f}")


def immunize_config(cfg: ExperimentConfig, method: str):
    """The immunize.ImmunizeConfig of one method: toy or paper defaults, then the file's settings."""
    from .config import ConfigError
    from .immunize import ImmunizeConfig

    overrides = {**cfg.immunize.settings, **cfg.immunize.per_method.get(method, {}), "method": method}
    overrides.setdefault("seed", cfg.seed)
    known = set(ImmunizeConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"immunize.settings: unknown keys {unknown}; known: {sorted(known)}")
    icfg = ImmunizeConfig.toy(**overrides) if cfg.is_toy else ImmunizeConfig(**overrides)
    try:
        icfg.validate()
    except ValueError as err:
        raise ConfigError(f"immunize ({method}): {err}") from None
    return icfg


def immunize(cfg: ExperimentConfig, run_dir: Path, force: bool = False) -> ImmunizeStageResult:
    from .immunize import immunize as run_immunize
    from .immunize import save_immunized

    data = load_data(cfg, run_dir)
    concept_images = {attack_prompt(cfg, c): data.images[c]["immunize"] for c in cfg.concepts}
    reg = {p: ims for p, ims in data.regularization.items() if ims}
    runs = {}
    for method in cfg.immunize.methods:
        folder = Path(run_dir) / "immunized" / slug(method)
        icfg = immunize_config(cfg, method)
        settings = {**_settings(cfg, "erase", "data"), "immunize": asdict(icfg)}
        if _fresh(folder, settings, force):
            log(f"immunizing with {method}")
            remove_stale_temporaries(folder)  # what a killed earlier try left (its checkpoint stays)
            pipe = starting_pipeline(cfg, run_dir)
            result = run_immunize(pipe, concept_images, reg or None, None, icfg,
                                  checkpoint_dir=folder / "checkpoint")
            save_immunized(result, folder)
            (folder / "losses.json").write_text(json.dumps({"losses": result.losses, "extras": result.extras}))
            write_manifest(folder, settings, icfg.seed)
        info = json.loads((folder / "immunize.json").read_text())
        info.update(json.loads((folder / "losses.json").read_text()))
        runs[method] = info
    return ImmunizeStageResult(cfg, Path(run_dir) / "immunized", runs)


def show_immunization(res: ImmunizeStageResult, path: str | Path | None = None):
    """Upper-level loss of the merged (or adapted) model per step, one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m, info in res.runs.items():
        target = [e.get("target", float("nan")) for e in info["extras"]]
        ax.plot(range(1, len(target) + 1), target, label=m)
    ax.set_xlabel("immunization step")
    ax.set_ylabel("attacked-model loss on targets")
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


from .stages_eval import attack, report, show_attacks  # noqa: E402,F401  (stages 04-06; they import this module)
