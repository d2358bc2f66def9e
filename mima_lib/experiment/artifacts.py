"""Artifacts of a run: written atomically (temp file + rename), described by a manifest.

A stage writes its outputs into one folder and, last, `manifest.json`: the settings that produced them,
library versions, the seed and a hash of every file. A later stage (or a re-run) calls `check_manifest`:
missing manifest = the stage never finished (its outputs are redone); settings that differ from the
ones asked for = refuse with a message, instead of mixing results of two configurations.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import __version__
from ..method.tensor_io import atomic_write_text

MANIFEST = "manifest.json"


@contextmanager
def atomic_folder(path: str | Path):
    """Build a folder under a hidden temporary name; rename it to `path` only when the block ends normally.

        with atomic_folder(run_dir / "data" / "cat" / "immunize") as tmp:
            ...write files into tmp...

    A reader (or a restarted run) sees the old folder or the complete new one, never a half-written one: a
    process killed inside the block leaves only a hidden `.NAME.PID.tmp` (or, between the two renames, a
    `.NAME.PID.old`) sibling, which `remove_stale_temporaries` deletes. An existing `path` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    if tmp.exists():  # left by an earlier process that had the same id
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():  # a directory cannot be renamed over a non-empty one: move the old one aside first
        old = path.parent / f".{path.name}.{os.getpid()}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete what killed writers left under folder: `atomic_folder`'s and `atomic_write_bytes`'s hidden
    `.*.tmp` / `.*.old` entries. Call it only while no other process writes there. Returns what it removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted((p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old"))), key=lambda p: len(p.parts))
    removed = []
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink(missing_ok=True)
        else:
            continue  # inside a folder removed just before
        removed.append(p)
    return removed


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def versions() -> dict:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "mima_lib": __version__}


def write_manifest(folder: str | Path, settings: dict, seed: int | None = None, extra: dict | None = None) -> dict:
    """Record settings, versions, seed and file hashes; written last, so it marks the stage complete."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    manifest = {"settings": settings, "seed": seed, "versions": versions(),
                "files": {str(p.relative_to(folder)): file_hash(p) for p in files}, **(extra or {})}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True, default=str))
    return manifest


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


class ManifestMismatch(RuntimeError):
    pass


def check_manifest(folder: str | Path, settings: dict, verify_files: bool = False) -> bool:
    """True if folder holds a finished stage made with these settings; False if it never finished.

    Raises ManifestMismatch (naming the differing keys) if it finished with other settings, and with
    verify_files=True if a file changed since (hash mismatch) or is gone.
    """
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    old = json.loads(json.dumps(manifest["settings"], sort_keys=True, default=str))
    new = json.loads(json.dumps(settings, sort_keys=True, default=str))
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ManifestMismatch(f"{folder} was made with other settings (differing: {diff}); use force=True "
                               "(--force) to redo it, or another experiment name to keep both")
    if verify_files:
        for rel, digest in manifest["files"].items():
            p = Path(folder) / rel
            if not p.exists() or file_hash(p) != digest:
                raise ManifestMismatch(f"{p} changed or vanished since its stage finished; re-run with force")
    return True
