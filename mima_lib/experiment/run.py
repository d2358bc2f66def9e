"""Run the notebook sequence headless with papermill.

    python -m mima_lib.experiment.run papermill_params/default.yaml            # the whole sequence
    python -m mima_lib.experiment.run papermill_params/default.yaml --only 03  # one stage (its inputs must exist)
    python -m mima_lib.experiment.run papermill_params/default.yaml --force    # redo stages whose outputs exist
    python -m mima_lib.experiment.run FILE --set attack.settings.lora.steps=3 --set device=cpu   # override keys

The parameter file, with the overrides, is validated before any notebook starts; its effective version (the
overrides applied, relative paths made absolute against the file's folder) is written to
runs/<experiment>/params.yaml and is what every notebook reads. Each notebook is executed into
runs/<experiment>/notebooks/, reads and writes runs/<experiment>/, and skips work whose outputs exist (unless
forced). On error the runner names the failing notebook and cell and exits 1.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .dataclass_yaml import ConfigError
from .progress import LogForwarder

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
SEQUENCE = ["01_data", "02_erasure", "03_immunization", "04_relearning_attack", "05_personalization_attack",
            "06_report"]


def stages_for(cfg, only: list[str] | None) -> list[str]:
    """The notebooks this experiment runs: re-learning skips personalization and vice versa."""
    skip = "05_personalization_attack" if cfg.task == "relearning" else "04_relearning_attack"
    seq = [s for s in SEQUENCE if s != skip]
    if cfg.task == "personalization":
        seq = [s for s in seq if s != "02_erasure"]  # nothing to erase: the concepts are new
    if only:
        unknown = [o for o in only if not any(s.startswith(o) for s in SEQUENCE)]
        if unknown:
            raise ConfigError(f"--only {unknown[0]!r} names no notebook; choose from {SEQUENCE}")
        seq = [s for s in seq if any(s.startswith(o) for o in only)]
    return seq


def kernel_manager_class(folder: str):
    """A kernel manager whose kernels talk over IPC sockets in ``folder`` (an absolute path: the kernel runs
    in notebooks/): local, so ipykernel has no reason to print its warning about TCP without encryption
    before every notebook, as it does on the default transport (TCP on localhost)."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self):
            return "ipc"

        @default("ip")
        def _ip_default(self):
            return str(Path(folder).resolve() / "kernel")

    return IPCKernelManager


def run_sequence(params_file: str | Path, only: list[str] | None = None, force: bool = False,
                 run_root: str | Path = "runs", log=print, overrides=()) -> Path:
    import papermill as pm
    import yaml

    from ..method.tensor_io import atomic_write_text
    from .config import run_dir_for
    from .loading import effective_parameters, load_experiment

    params_file = Path(params_file).resolve()
    cfg = load_experiment(params_file, overrides)  # everything is checked here, before the first notebook
    run_dir = run_dir_for(cfg, Path(run_root).resolve())  # absolute: the notebooks run in notebooks/
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    effective = run_dir / "params.yaml"
    atomic_write_text(effective, f"# {params_file} with {list(overrides) or 'no overrides'}\n"
                      + yaml.safe_dump(effective_parameters(params_file, overrides), sort_keys=False))
    params = dict(params_file=str(effective), run_root=str(Path(run_root).resolve()), force=force)
    stages = stages_for(cfg, only)
    log(f"experiment {cfg.experiment!r}: {len(stages)} notebooks -> {run_dir}")
    for k, stage in enumerate(stages, 1):
        src, dst = NOTEBOOK_DIR / f"{stage}.ipynb", out_dir / f"{stage}.ipynb"
        if not src.exists():
            raise FileNotFoundError(f"notebook {src} is missing; regenerate it with `jupytext --sync notebooks/*.py`")
        t0 = time.time()
        log(f"[{k}/{len(stages)}] {stage} ...")
        try:  # the stages' progress lines (timestamped) come through stdout_file as the cells run
            with tempfile.TemporaryDirectory(prefix="mima-kernel-") as sockets:
                pm.execute_notebook(str(src), str(dst), parameters=params, kernel_name="python3",
                                    cwd=str(NOTEBOOK_DIR), progress_bar=False, log_output=False,
                                    stdout_file=LogForwarder(log), kernel_manager_class=kernel_manager_class(sockets))
        except pm.PapermillExecutionError as err:
            raise RuntimeError(f"notebook {stage} failed in cell {err.exec_count} ({err.ename}: {err.evalue}); "
                               f"the executed notebook with the traceback is {dst}") from None
        log(f"[{k}/{len(stages)}] {stage} done in {time.time() - t0:.0f} s")
    report = run_dir / "report" / "report.md"
    log(f"report: {report if report.exists() else run_dir / 'report'}")
    return run_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params_file")
    ap.add_argument("--only", action="append", help="run only notebooks whose name starts with this (repeatable)")
    ap.add_argument("--force", action="store_true", help="recompute stages whose outputs already exist")
    ap.add_argument("--run-root", default="runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override one setting of the file (repeatable), validated like the file")
    args = ap.parse_args(argv)
    try:
        run_sequence(args.params_file, args.only, args.force, args.run_root, overrides=args.set)
    except (ConfigError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
