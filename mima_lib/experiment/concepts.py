"""One record per concept of an experiment, built once from the parameter file and passed down.

Every prompt a stage needs comes from here, never from string surgery in the stages:

    prompt          the concept's own prompt: what erasure removes and the attacker re-learns
                    ("an artwork of Kelly McKernan", "a photo of a cat")
    attack_prompt   what immunization and the attacker train on: the prompt (re-learning), or a modifier-token
                    prompt for a new instance (personalization: "a photo of <new1> cat")
    ti_prompt       Textual Inversion's prompt, with the placeholder in place of the concept's words
                    ("an artwork of <new1>"); None where no placeholder can be placed
    guide           UCE's target for this concept ("" in the reference code)
    generic_prompt  the prompt of the concept's kind: regularization data ("artwork", "a photo of an object")
    class_prompt    an instance's class ("a photo of a cat" for "a photo of <new1> cat"): what personalization
                    must leave drawable; None for artists and objects

A toy-world concept's record comes from the toy world (which owns its prompts); any other concept is defined
in the parameter file (``definitions:``) with its kind, never guessed from its words.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..attacks.data import MODIFIER_TOKEN
from .dataclass_yaml import ConfigError

KINDS = ("artist", "object", "instance")
# a real model's generic prompts (the toy world has its own)
GENERIC_PROMPTS = {"artist": "artwork", "object": "a photo of an object", "instance": "a photo of an object"}


@dataclass
class ConceptDefinition:
    """A concept the toy world does not know, as the parameter file defines it (``definitions: {name: ...}``)."""

    kind: str | None = field(default=None, metadata={"choices": KINDS})
    prompt: str | None = None
    attack_prompt: str | None = None  # default: prompt
    ti_prompt: str | None = None  # default: prompt with the concept's name replaced by the placeholder
    guide: str | None = None  # default: erase.guide, else the generic prompt
    generic_prompt: str | None = None  # default: GENERIC_PROMPTS[kind]
    class_prompt: str | None = None  # instances: default the attack prompt without the modifier token


@dataclass(frozen=True)
class Concept:
    """Everything the stages need to know of one concept (see the module docstring)."""

    name: str
    kind: str
    prompt: str
    attack_prompt: str
    ti_prompt: str | None
    guide: str
    generic_prompt: str
    class_prompt: str | None
    toy: bool  # the toy world knows it: it can render it and its oracle can recognise it


def placeholder_prompt(prompt: str, name: str, token: str = MODIFIER_TOKEN) -> str | None:
    """``prompt`` with the concept's name (any case, spacing as in the name) replaced by ``token``, or None
    if the name does not occur: "an artwork of Kelly McKernan" -> "an artwork of <new1>"."""
    words = name.split()
    if not words:
        return None
    pattern = r"\b" + r"\s+".join(re.escape(w) for w in words) + r"\b"
    out, n = re.subn(pattern, token, prompt, count=1, flags=re.IGNORECASE)
    return out if n else None


def _toy_record(name: str, task: str, guide: str | None, token: str) -> Concept:
    from ..toy import world

    c = world.concept(name)
    attack = c.personalization_prompt(token) if task == "personalization" and c.kind == "instance" else c.prompt
    return Concept(c.name, c.kind, c.prompt, attack, c.textual_inversion_prompt(token),
                   guide if guide is not None else c.generic_prompt, c.generic_prompt,
                   c.class_prompt if c.kind == "instance" else None, toy=True)


def _defined_record(name: str, d: ConceptDefinition, guide: str | None, token: str) -> Concept:
    where = f"definitions.{name}"
    if d.kind is None:
        raise ConfigError(f"{where}.kind: missing; say what the concept is: one of {list(KINDS)}")
    if not d.prompt or not d.prompt.strip():
        raise ConfigError(f"{where}.prompt: missing or empty; give the concept's prompt, e.g. "
                          f"'an artwork of {name}' or 'a photo of {MODIFIER_TOKEN} cat'")
    attack = d.attack_prompt or d.prompt
    if d.kind == "instance" and token not in attack.split():
        raise ConfigError(f"{where}: an instance is learned under a modifier token, but {attack!r} has no "
                          f"{token!r}; write it as e.g. 'a photo of {token} cat'")
    ti = d.ti_prompt or (attack if token in attack.split() else placeholder_prompt(d.prompt, name, token))
    if ti is not None and token not in ti.split():
        raise ConfigError(f"{where}.ti_prompt: {ti!r} must contain the placeholder {token!r} as a word")
    generic = d.generic_prompt or GENERIC_PROMPTS[d.kind]
    g = d.guide if d.guide is not None else (guide if guide is not None else generic)
    cls = d.class_prompt or (" ".join(w for w in attack.split() if w != token) if d.kind == "instance" else None)
    return Concept(name, d.kind, d.prompt, attack, ti, g, generic, cls, toy=False)


def build_concepts(names: list[str], definitions: dict, task: str, erase_guide: str | None,
                   token: str = MODIFIER_TOKEN) -> dict[str, Concept]:
    """{name: Concept} for every name; unknown names fail with the fix (define it, or check the spelling)."""
    out = {}
    for name in dict.fromkeys(names):
        if name in definitions:
            out[name] = _defined_record(name, definitions[name], erase_guide, token)
            continue
        try:
            out[name] = _toy_record(name, task, erase_guide, token)
        except KeyError as err:
            raise ConfigError(f"concepts: {err.args[0]}; or define it under `definitions:` with its kind and "
                              "prompt (e.g. definitions: {NAME: {kind: artist, prompt: an artwork of NAME}})") \
                from None
    return out
