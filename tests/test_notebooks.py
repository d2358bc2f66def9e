"""Every notebook executes under papermill with the smoke parameters (real kernel, real execution),
and notebooks are committed without outputs, in sync with their py:percent twins."""
import json
from pathlib import Path

import jupytext
import nbformat
import pytest

from mima_lib.experiment.run import NOTEBOOK_DIR, SEQUENCE, run_sequence

PARAMS = Path(__file__).resolve().parent.parent / "papermill_params"
# smoke_run (conftest.py): one uninterrupted run of papermill_params/smoke.yaml, shared with test_resume_stages.py


@pytest.mark.parametrize("path", sorted(NOTEBOOK_DIR.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_clean_and_paired(path):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} has outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    twin = jupytext.read(path.with_suffix(".py"))
    assert [c.source for c in twin.cells] == [c.source for c in nb.cells], \
        f"{path.name} and its .py differ: run `jupytext --sync notebooks/{path.stem}.py`"


@pytest.mark.xdist_group("smoke_run")  # one worker computes the shared smoke run (conftest.py)
def test_sequence_runs_under_papermill(smoke_run):
    executed = sorted(p.stem for p in (smoke_run / "notebooks").glob("*.ipynb"))
    assert executed == [s for s in SEQUENCE if s != "05_personalization_attack"]
    for p in (smoke_run / "notebooks").glob("*.ipynb"):
        nb = json.loads(p.read_text())
        errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, p.name
        assert any(c.get("outputs") for c in nb["cells"]), f"{p.name} ran no cell with output"
    report = (smoke_run / "report" / "report.md").read_text()
    assert "MSGR" in report and "mima" in report and "imma-joint" in report
    assert (smoke_run / "report" / "lora_oracle_sgr.png").stat().st_size > 1000


@pytest.mark.xdist_group("smoke_run")
def test_rerun_skips_finished_stages(smoke_run, capfd):
    before = (smoke_run / "immunized" / "mima" / "immunized.safetensors").stat().st_mtime_ns
    lines = []
    run_sequence(PARAMS / "smoke.yaml", only=["03"], run_root=smoke_run.parent, log=lines.append)
    assert (smoke_run / "immunized" / "mima" / "immunized.safetensors").stat().st_mtime_ns == before
    # the stage's timestamped lines come out of the kernel while the notebook runs (indented under its name)
    assert any(line.startswith("    [") and "mima:" in line and "s/step" in line for line in lines), lines
    # the kernel runs on IPC sockets: ipykernel no longer warns about TCP without encryption
    assert "without encryption" not in capfd.readouterr().err


def test_failing_notebook_is_named(tmp_path):
    # a parameter file that validates but fails at run time: its concept folder holds no images
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"experiment: broken\nconcepts: [cat]\ndata: {{image_root: {tmp_path / 'imgs'}}}\n")
    with pytest.raises(RuntimeError, match="notebook 01_data failed in cell .* executed notebook"):
        run_sequence(bad, run_root=tmp_path / "runs", log=lambda m: None)


def test_relative_run_root_works_from_any_directory(tmp_path, monkeypatch):
    """`make demo` passes no run root: the default "runs" is relative to where it is called, while the
    notebooks run in notebooks/; the effective parameter file they read must still be found."""
    monkeypatch.chdir(tmp_path)
    run_dir = run_sequence(PARAMS / "smoke.yaml", only=["01"], log=lambda m: None)
    assert run_dir.is_absolute() and run_dir == tmp_path / "runs" / "smoke"
    assert (run_dir / "params.yaml").exists() and (run_dir / "notebooks" / "01_data.ipynb").exists()
