"""Fuzz-style checks: malformed parameter files and image folders never crash without a clear message,
and a refused run overwrites nothing."""
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mima_lib.attacks.data import load_concept_folder, write_concept_folder
from mima_lib.experiment.dataclass_yaml import ConfigError
from mima_lib.experiment.loading import load_experiment

SMOKE = Path(__file__).resolve().parent.parent / "papermill_params" / "smoke.yaml"
ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789 :-[]{},.'\"\n\t#*&!|>%@`")


def _mutate(text: str, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        i = rng.randrange(len(chars) + 1)
        if op < 0.4 and chars:
            del chars[min(i, len(chars) - 1)]
        elif op < 0.8:
            chars.insert(i, rng.choice(ALPHABET))
        elif chars:
            chars[min(i, len(chars) - 1)] = rng.choice(ALPHABET)
    return "".join(chars)


def test_mutated_parameter_files_fail_only_with_config_errors(tmp_path):
    rng = random.Random(0)
    text = SMOKE.read_text()
    outcomes = {"ok": 0, "refused": 0}
    for k in range(300):
        path = tmp_path / f"m{k}.yaml"
        path.write_text(_mutate(text, rng))
        try:
            load_experiment(path)
            outcomes["ok"] += 1
        except ConfigError as err:
            assert str(path) in str(err) or "YAML" in str(err) or "parameter file" in str(err), str(err)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 50  # the mutations do break things, and every break was explained


@pytest.mark.parametrize("value", [None, 3, "x", [1, 2], {"a": 1}, -1, 1e9, True, [None], ""])
def test_every_field_rejects_or_accepts_any_value_cleanly(tmp_path, value):
    base = yaml.safe_load(SMOKE.read_text())
    keys = [(k,) for k in base] + [(k, j) for k, v in base.items() if isinstance(v, dict) for j in v]
    for key in keys:
        data = yaml.safe_load(SMOKE.read_text())
        target = data
        for part in key[:-1]:
            target = target[part]
        target[key[-1]] = value
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump(data))
        try:
            load_experiment(path)
        except ConfigError:
            pass


def _png(path: Path, size=(32, 32), colour=(200, 10, 10)):
    Image.new("RGB", size, colour).save(path)


@pytest.mark.parametrize("case, match", [
    ("empty", "no images"),
    ("non_image", "not images"),
    ("wrong_size", "size"),
    ("corrupt", "corrupt|truncated|cannot|unreadable"),
    ("missing_row", "metadata"),
])
def test_bad_image_folders_are_explained(tmp_path, case, match):
    folder = tmp_path / "concept"
    write_concept_folder(folder, [Image.new("RGB", (32, 32), (i, 0, 0)) for i in range(3)], "a photo of a cat")
    if case == "empty":
        for p in folder.iterdir():
            p.unlink()
    elif case == "non_image":
        (folder / "notes.txt").write_text("hello")
    elif case == "wrong_size":
        _png(folder / "0001.png", (40, 32))
    elif case == "corrupt":
        data = (folder / "0002.png").read_bytes()
        (folder / "0002.png").write_bytes(data[: len(data) // 2])
    elif case == "missing_row":
        _png(folder / "extra.png")
    snapshot = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_concept_folder(folder, size=32)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == snapshot  # nothing was overwritten


def test_random_bytes_as_images_are_explained(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(20):
        folder = tmp_path / f"c{k}"
        write_concept_folder(folder, [Image.new("RGB", (32, 32))] * 2, "a photo of a cat")
        (folder / "0001.png").write_bytes(rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes())
        with pytest.raises(ValueError):
            load_concept_folder(folder, size=32)
