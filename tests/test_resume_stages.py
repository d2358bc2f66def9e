"""Killed and restarted, the data stage and a whole run of the notebook sequence end byte-identical to an
uninterrupted run (issue #8). The training loop, immunization and the attacks have their own kill tests in
test_training.py and test_immunize.py."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mima_lib.experiment import stages
from mima_lib.experiment.stages.data import PART_DONE
from mima_lib.experiment.config import run_dir_for
from mima_lib.experiment.loading import load_experiment

ROOT = Path(__file__).resolve().parent.parent
DATA_HELPER = Path(__file__).parent / "helpers" / "data_small.py"
PARAMS = ROOT / "papermill_params"

# three concepts, batches of 4 over 5 images (a full and a partial batch), two regularization prompts
DATA_CONFIG = """\
experiment: datakill
model: toy
seed: 0
concepts: [van gogh, cat, umbrella]
data: {immunization_images: 3, attack_images: 2, reference_images: 2, regularization_images: 4,
       sample_steps: 3, batch_size: 4}
"""


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones too), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and all its descendants at once (a whole job dying), and wait until they are gone."""
    procs = [psutil.Process(proc.pid)]
    try:
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    gone, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"processes survived SIGKILL: {alive}"


def _wait_for(proc: subprocess.Popen, ready, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------ 01 data
def _data_run(params: Path, root: Path, pause: float = 0.0) -> tuple[int, str]:
    """Run the data stage to its end; (exit status, its output)."""
    r = subprocess.run([sys.executable, str(DATA_HELPER), str(params), str(root), str(pause)], env=_env(),
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def test_killed_data_stage_resumes_byte_identical(tmp_path):
    params = tmp_path / "datakill.yaml"
    params.write_text(DATA_CONFIG)
    rc, out = _data_run(params, tmp_path / "clean")
    assert rc == 0, out[-2000:]
    data = tmp_path / "killed" / "datakill" / "data"
    # a 1 s pause before each generation call leaves a wide window between the first complete part and the end
    victim = subprocess.Popen([sys.executable, str(DATA_HELPER), str(params), str(tmp_path / "killed"), "1.0"],
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(victim, lambda: any(data.rglob(PART_DONE)), 240)
    _kill_tree(victim)
    assert victim.returncode == -signal.SIGKILL
    done = sorted(m.parent for m in data.rglob(PART_DONE))
    assert done, "no part was complete when the data stage was killed"
    assert not (data / "manifest.json").exists(), "the data stage finished before it could be killed"
    assert len(done) < 11, "every part was already written when the data stage was killed"
    before = {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for d in done for p in [d, *d.iterdir()]}

    rc, out = _data_run(params, tmp_path / "killed")
    assert rc == 0, out[-2000:]
    assert f"resumed: {len(done)} part(s) were already complete" in out
    after = {p: (Path(p).stat().st_ino, Path(p).stat().st_mtime_ns) for p in before}
    assert after == before, "a part that was complete before the kill was written again"
    a, b = _files(tmp_path / "clean" / "datakill" / "data"), _files(data)
    assert sorted(a) == sorted(b)  # same files, no temporaries left behind
    assert sum(k.endswith(".png") for k in a) == 3 * (3 + 2 + 2) + 4
    for k in a:
        assert a[k] == b[k], f"{k} differs from the uninterrupted run"


def test_data_stage_redoes_incomplete_parts_and_cleans_temporaries(tmp_path):
    """The states a kill can leave (a part without its marker, a half-written temporary folder, a stray
    temporary file) and a part made with other settings are all redone; complete parts are kept."""
    params = tmp_path / "datakill.yaml"
    params.write_text(DATA_CONFIG.replace("concepts: [van gogh, cat, umbrella]", "concepts: [van gogh, cat]"))
    cfg = load_experiment(params)
    run_dir = run_dir_for(cfg, tmp_path / "runs")
    data = run_dir / "data"
    stages.make_data(cfg, run_dir)
    reference = _files(data)

    (data / "manifest.json").unlink()  # the stage never finished ...
    (data / "cat" / "attack" / PART_DONE).unlink()  # ... a part written by older code, no marker
    (data / "cat" / "attack" / "0001.png").write_bytes(b"\x89PNG truncated")
    shutil.rmtree(data / "van_gogh" / "reference")  # a part that was never written ...
    (data / "van_gogh" / ".reference.4242.tmp").mkdir()  # ... its writer killed mid-way
    (data / "van_gogh" / ".reference.4242.tmp" / "0000.png").write_bytes(b"half")
    (data / ".manifest.json.abc.tmp").write_bytes(b"{")  # an interrupted atomic_write_text
    marker = data / "regularization" / "artwork" / PART_DONE  # a part of a run with other settings
    record = json.loads(marker.read_text())
    record["settings"]["data"]["sample_steps"] = 7
    marker.write_text(json.dumps(record))
    kept = data / "cat" / "immunize" / "0000.png"
    stamp = (kept.stat().st_ino, kept.stat().st_mtime_ns)

    res = stages.make_data(cfg, run_dir)
    assert _files(data) == reference
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == stamp, "a complete part was rewritten"
    assert len(res.images["cat"]["attack"]) == 2 and len(res.regularization["artwork"]) == 2

    stages.make_data(cfg, run_dir, force=True)  # force redoes every part, with the same bytes
    assert _files(data) == reference
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) != stamp


# ------------------------------------------------------------------------------- the whole sequence
# Files that legitimately differ between two uninterrupted runs: executed notebooks (execution timestamps,
# durations and logged clock times) are skipped; immunize.json records the measured seconds per step, and
# the immunization manifest the hash of that file, so both are compared without those two entries.
def _comparable(rel: str, content: bytes):
    if rel.startswith("notebooks/"):
        return None
    parts = rel.split("/")
    if parts[0] == "immunized" and parts[-1] == "immunize.json":
        d = json.loads(content)
        assert isinstance(d.pop("seconds_per_step"), float)
        return d
    if parts[0] == "immunized" and parts[-1] == "manifest.json":
        d = json.loads(content)
        assert d["files"].pop("immunize.json")
        return d
    return content


@pytest.mark.xdist_group("smoke_run")  # one worker computes the shared smoke run (conftest.py)
def test_killed_run_of_the_sequence_resumes_identical(smoke_run, tmp_path):
    cmd = [sys.executable, "-m", "mima_lib.experiment.run", str(PARAMS / "smoke.yaml"), "--run-root", str(tmp_path)]
    run_dir = tmp_path / smoke_run.name
    attacks = run_dir / "attacks"
    # order of the attacks: no defense, mima, imma-joint x van gogh, cat; kill the third one after its first
    # snapshot (stages 01-03 and two attacks are finished then)
    trigger = attacks / "mima" / "van_gogh" / "lora" / "seed0" / "checkpoint" / "snapshot_000000.safetensors"
    log = tmp_path / "killed.log"  # a file, not a pipe: nobody reads while the run goes on
    with open(log, "w") as f:
        victim = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    _wait_for(victim, trigger.exists, 480)
    _kill_tree(victim)  # the runner and its notebook kernel
    assert victim.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert not (run_dir / "report" / "report.md").exists(), "the run finished before it could be killed"
    assert not (attacks / "imma_joint" / "cat" / "lora" / "seed0" / "manifest.json").exists()
    finished = [run_dir / "data", run_dir / "erased", run_dir / "immunized",
                *(p.parent for p in attacks.rglob("manifest.json"))]
    assert len(finished) >= 5, finished  # the three stages and at least two attacks
    stamps = {str(p): p.stat().st_mtime_ns for f in finished for p in f.rglob("*") if p.is_file()}

    resumed = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {p: Path(p).stat().st_mtime_ns for p in stamps} == stamps, "a finished stage was computed again"

    a, b = _files(smoke_run), _files(run_dir)
    assert sorted(a) == sorted(b)
    compared = 0
    for rel in a:
        x, y = _comparable(rel, a[rel]), _comparable(rel, b[rel])
        assert x == y, f"{rel} differs from the uninterrupted run"
        compared += x is not None
    assert compared > 90 and any(k.startswith("attacks/") and k.endswith("snapshots.safetensors") for k in a)
    assert {"report/report.md", "report/lora.csv", "report/utility.csv"} <= set(a)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
