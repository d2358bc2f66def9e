"""The notebooks teach what they say: every `mima_lib` name their markdown mentions exists, each executed
notebook shows the figures it promises, 05 (not in the relearning sequence) executes too, and the runner's
progress lines and ETA are what they claim."""
import ast
import functools
import importlib
import json
import re
from pathlib import Path

import nbformat
import pytest

from mima_lib.experiment.progress import LogForwarder, Progress
from mima_lib.experiment.run import NOTEBOOK_DIR

ROOT = NOTEBOOK_DIR.parent
PACKAGE = ROOT / "mima_lib"
# Names in backticks that are not mima_lib's own: diffusers' module names, file names, shell words, maths.
EXTERNAL = {"attn2", "to_k", "to_v", "metadata", "csv", "safetensors", "json", "md", "png", "ipynb", "torch", "linalg",
            "solve_ex", "jupyter", "lab"}
# Image outputs (PNG) each executed notebook of the smoke run must hold, at least: what its markdown promises.
FIGURES = {"01_data": 4, "02_erasure": 3, "03_immunization": 3, "04_relearning_attack": 4, "06_report": 7}


@functools.lru_cache(maxsize=1)
def _defined_names() -> frozenset[str]:
    """Every name mima_lib's code defines or accepts: modules, functions, classes, their parameters,
    assigned names and attributes, dataclass fields, and the keys of dict literals (settings)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        names.add(path.stem)
        names.update(path.relative_to(ROOT).parent.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
            elif isinstance(node, ast.Dict):
                names.update(k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
    return frozenset(names)


def _resolve(dotted: str) -> bool:
    """True if mima_lib.a.b.c is a module, or an attribute chain from the longest importable module."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _backticked(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    # a cell's lines joined with spaces: a name in backticks may wrap onto the next line
    cells = [" ".join(c.source.split("\n")) for c in nb.cells if c.cell_type == "markdown"]
    return [t for text in cells for t in re.findall(r"`([^`]+)`", text)]


CODE_NAME = re.compile(r"^[A-Za-z_]\w*(\.\w+)*(\(\))?$")


@pytest.mark.parametrize("path", sorted(NOTEBOOK_DIR.glob("*.ipynb")), ids=lambda p: p.name)
def test_markdown_names_exist_in_the_code(path):
    defined, missing = _defined_names(), []
    for token in _backticked(path):
        token = token.strip()
        call = re.match(r"(mima_lib(\.\w+)+)\(", token)  # mima_lib.x.f(...): check the name before the call
        if call:
            token = call.group(1)
        if token.startswith(("mima_lib/", "papermill_params/", "notebooks/", "scripts/")):  # a file or folder
            if not (ROOT / token.split("<")[0].rstrip("/")).exists():
                missing.append(token)
            continue
        if not CODE_NAME.match(token):
            continue  # prose in backticks: a command, a prompt, a setting with its value
        token = token.removesuffix("()")
        if token.startswith("mima_lib."):
            if not _resolve(token):
                missing.append(token)
        elif any(part not in defined and part not in EXTERNAL for part in token.split(".")):
            missing.append(token)
    assert not missing, f"{path.name} mentions names the code does not have: {missing}"


def test_the_name_check_catches_a_wrong_name():
    assert _resolve("mima_lib.method.merge.merge_projection")
    assert not _resolve("mima_lib.method.merge.merge_weights")
    assert "uce_edit" in _defined_names() and "merge_weights" not in _defined_names()


def _sockets() -> str:
    """A short folder for the kernel's IPC sockets (a socket path has at most 107 characters)."""
    import tempfile

    return tempfile.mkdtemp(prefix="mima-kernel-")


def _images(nb: dict) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))


@pytest.mark.xdist_group("smoke_run")  # one worker computes the shared smoke run (conftest.py)
def test_executed_notebooks_show_their_figures(smoke_run):
    got = {p.stem: _images(json.loads(p.read_text())) for p in (smoke_run / "notebooks").glob("*.ipynb")}
    assert set(got) == set(FIGURES)
    short = {k: (got[k], n) for k, n in FIGURES.items() if got[k] < n}
    assert not short, f"notebooks with fewer figures than promised (got, want): {short}"
    # 03's unrolled step prints the exact hypergradient's agreement with central differences
    nb = json.loads((smoke_run / "notebooks" / "03_immunization.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    agree = re.search(r"exact: [^\n]*relative to finite differences: ([0-9.e+-]+)\)", text)
    assert agree and float(agree.group(1)) < 1e-5, text[-2000:]
    residual = re.search(r"merged W: \|\|W C\^T - V\^T\|\| / \|\|V\|\| = ([0-9.e+-]+)", text)
    assert residual and float(residual.group(1)) < 1e-8


@pytest.mark.xdist_group("smoke_run")
def test_personalization_notebook_executes(smoke_run, tmp_path):
    """05 is not in the relearning sequence: run it on the smoke run's finished attacks (nothing recomputed)."""
    import papermill as pm

    from mima_lib.experiment.run import kernel_manager_class

    out = tmp_path / "05.ipynb"
    pm.execute_notebook(str(NOTEBOOK_DIR / "05_personalization_attack.ipynb"), str(out), cwd=str(NOTEBOOK_DIR),
                        parameters={"params_file": str(smoke_run / "params.yaml"), "run_root": str(smoke_run.parent)},
                        progress_bar=False, kernel_name="python3",
                        kernel_manager_class=kernel_manager_class(_sockets()))
    nb = json.loads(out.read_text())
    assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert _images(nb) >= 4


def _clock(*times):
    """A clock that reads these times, one per call (construction, then one per update)."""
    it = iter(times)
    return lambda: next(it)


def test_progress_lines_count_units_and_estimate_the_rest():
    lines = []  # constructed at 0 s, then one unit every 10 s
    bar = Progress("attacks done", 4, lines.append, every=1, clock=_clock(0.0, 10.0, 20.0, 30.0, 40.0))
    for _ in range(4):
        bar.update()
    assert lines[0] == "attacks done: 1/4 (25%), 10 s elapsed, ETA 30 s"
    assert lines[-1] == "attacks done: 4/4 (100%), 40 s elapsed, ETA 0 s"


def test_resumed_progress_estimates_from_the_units_it_ran():
    lines = []
    bar = Progress("step", 10, lines.append, every=1, clock=_clock(0.0, 5.0, 10.0))
    bar.update(6)  # a resumed run: steps 1-5 came from the checkpoint
    bar.update(7)
    assert lines == ["step: 6/10 (60%), 5 s elapsed, ETA 20 s", "step: 7/10 (70%), 10 s elapsed, ETA 15 s"]


def test_forwarder_passes_whole_stage_lines_only():
    got = []
    f = LogForwarder(got.append)
    f.write("[12:00:01] immunize mima: step 3/30 (10%), 9 s ela")
    f.write("psed, ETA 81 s\nplain print\n[not a stamp] x\n")
    assert got == ["    [12:00:01] immunize mima: step 3/30 (10%), 9 s elapsed, ETA 81 s"]


def test_demo_notebook_runs_headless(tmp_path):
    """The teaching demo, non-interactive, with a tiny click (the default click's time: scripts/time_demo.py)."""
    import papermill as pm

    from mima_lib.experiment.run import kernel_manager_class

    out = tmp_path / "demo.ipynb"
    pm.execute_notebook(str(NOTEBOOK_DIR / "demo_widgets.ipynb"), str(out), cwd=str(NOTEBOOK_DIR),
                        parameters={"interactive": False, "concepts": ["cat"], "immunize_steps": 2, "attack_steps": 4},
                        progress_bar=False, kernel_name="python3",
                        kernel_manager_class=kernel_manager_class(_sockets()))
    nb = json.loads(out.read_text())
    outputs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert _images(nb) >= 2  # before/after grid and attack curve
    shown = "".join("".join(o.get("data", {}).get("text/markdown", "")) + "".join(o.get("text", "")) for o in outputs)
    assert "| cat | 4 |" in shown and "ran in" in shown
