"""The experiment's stages, one module per notebook (layout of a run folder: common.py)."""
from .attack import attack, load_attacks, show_attack_curves, show_attack_losses, show_attacks
from .data import load_data, make_data, regularization_prompts, show_data
from .erasure import erase, show_erasure
from .immunization import immunize, show_immunization
from .report import report

__all__ = ["make_data", "load_data", "show_data", "regularization_prompts", "erase", "show_erasure", "immunize",
           "show_immunization", "attack", "load_attacks", "show_attacks", "show_attack_curves", "show_attack_losses", "report"]
