"""Adaptation attacks: fine-tuning that tries to (re-)learn a concept."""
from .common import AttackResult, finetune
from .lora import LoraSettings, lora_attack, save_lora

__all__ = ["AttackResult", "finetune", "LoraSettings", "lora_attack", "save_lora"]
