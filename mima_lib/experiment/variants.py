"""Attack cells of the seed grid: the file's attacks as they are, and stronger attackers derived from them.

A variant's name says what changes against the file's settings of that attack (attack.settings.<attack>,
over the toy's or the paper's defaults):

    lora-lr3x          LoRA with its learning rate x3 (any attack: <attack>-lr<k>x, k a number)
    lora-rank16        LoRA with rank 16 (rank<r>: LoRA only)
    dreambooth-lr2x    DreamBooth with its learning rate x2

Everything else (batch size, schedule) stays the attack's own; a variant runs as long as the attack it
strengthens, or to grid.variant_steps when the file sets it. Names are checked before any work starts (`parse_variant`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .dataclass_yaml import ConfigError

ATTACK_NAMES = ("lora", "textual_inversion", "dreambooth", "custom_diffusion")
BENIGN = "benign-lora"  # the harmless fine-tune of evaluate.benign_concepts: a LoRA cell of its own
_PATTERN = re.compile(r"^(?P<attack>[a-z_]+?)(?:-(?:lr(?P<lr>\d+(?:\.\d+)?)x|rank(?P<rank>\d+)))?$")


@dataclass(frozen=True)
class AttackCell:
    """One attack column of the grid: its name (folder and table label), the attack method, and the changes
    to that attack's settings (lr multiplied by lr_scale; rank replaced when given)."""

    name: str
    attack: str
    lr_scale: float = 1.0
    rank: int | None = None

    @property
    def is_variant(self) -> bool:
        return self.lr_scale != 1.0 or self.rank is not None


def parse_variant(name: str) -> AttackCell:
    """'lora', 'lora-lr3x', 'lora-rank16', 'dreambooth-lr2x', ... -> AttackCell; unknown names fail clearly."""
    m = _PATTERN.match(str(name))
    hint = ("write <attack>, <attack>-lr<k>x or lora-rank<r>, e.g. lora-lr3x, lora-rank16, dreambooth-lr2x; "
            f"attacks: {list(ATTACK_NAMES)}")
    if not m or m["attack"] not in ATTACK_NAMES:
        raise ConfigError(f"grid.variants: unknown attack variant {name!r}; {hint}")
    if m["rank"] is not None and m["attack"] != "lora":
        raise ConfigError(f"grid.variants: {name!r}: only LoRA has a rank; {hint}")
    lr = float(m["lr"]) if m["lr"] is not None else 1.0
    rank = int(m["rank"]) if m["rank"] is not None else None
    if lr <= 0 or (rank is not None and rank < 1):
        raise ConfigError(f"grid.variants: {name!r}: the lr factor must be > 0 and the rank >= 1")
    return AttackCell(str(name), m["attack"], lr, rank)


def attack_cells(cfg) -> list[AttackCell]:
    """The attack columns of one seed, in order: attack.methods, then grid.variants. A variant of an attack the
    file does not run is refused (its settings would be only the defaults: say which attack it strengthens)."""
    cells = [AttackCell(m, m) for m in cfg.attack.methods]
    for name in cfg.grid.variants:
        cell = parse_variant(name)
        if not cell.is_variant:
            raise ConfigError(f"grid.variants: {name!r} is a plain attack; list it in attack.methods instead")
        if cell.attack not in cfg.attack.methods:
            raise ConfigError(f"grid.variants: {name!r} strengthens {cell.attack!r}, which is not in "
                              f"attack.methods {cfg.attack.methods}; add it there")
        cells.append(cell)
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid.variants: duplicate attack cells in {names}")
    return cells


def cell_settings(cfg, cell: AttackCell, seed: int) -> dict:
    """The settings dict one attack run of this cell gets (stages.attack.attack_settings, then the variant;
    the harmless fine-tune's: stages.attack.benign_settings)."""
    from ..attacks import make_settings
    from .config import attack_defaults
    from .stages.attack import attack_settings, benign_settings, with_horizon

    if cell.name == BENIGN:
        return benign_settings(cfg, seed)
    s = attack_settings(cfg, cell.attack, seed)
    if not cell.is_variant:
        return s
    base = make_settings(cell.attack, dict(s), attack_defaults(cfg))
    if cell.lr_scale != 1.0:
        s["lr"] = float(base.lr) * cell.lr_scale
    if cell.rank is not None:
        s["rank"] = cell.rank
    return with_horizon(cfg, cell.attack, s, cfg.grid.variant_steps)  # the variant's own horizon
