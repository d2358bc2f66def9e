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

With `seeds: [0, 1, 2]` the whole sequence runs once per seed (its data draws, immunization and attacks), each
in runs/<experiment>/seed<k>/ with its own params.yaml, notebooks and report, sharing nothing with the others;
then runs/<experiment>/report/report.md gives every number as mean ± 95% CI over seeds (seed_summary.py).
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import threading
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
    before every notebook, as it does on the default transport (TCP on localhost); and that does not interrupt
    a kernel it is about to shut down."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self):
            return "ipc"

        @default("ip")
        def _ip_default(self):
            return str(Path(folder).resolve() / "kernel")

        async def _async_interrupt_kernel(self):
            # jupyter_client interrupts every kernel before it asks it to shut down; the idle kernel of a
            # finished notebook then prints "ERROR | KeyboardInterrupt caught in kernel". A kernel that does not
            # stop on the shutdown request is still killed after shutdown_wait_time.
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

    return IPCKernelManager


def seed_parameters(effective: dict, seed: int) -> dict:
    """The effective parameters of one seed of a `seeds:` file: its data draws, immunization and attack use
    `seed`, and it runs in its own folder runs/<experiment>/seed<k>/ (as the grid's seeds do)."""
    data = copy.deepcopy(effective)
    data.pop("seeds", None)
    data["seed"], data["run_subfolder"] = seed, f"seed{seed}"
    data["attack"] = {**(data.get("attack") or {}), "seeds": [seed]}
    return data


def run_sequence(params_file: str | Path, only: list[str] | None = None, force: bool = False,
                 run_root: str | Path = "runs", log=print, overrides=(), workers: int = 1) -> Path:
    """Run the notebooks of the file's experiment; with `seeds: [...]` the whole sequence once per seed, each in
    runs/<experiment>/seed<k>/ (in `workers` processes at once, one torch thread each), then the report over
    seeds (seed_summary.py) in runs/<experiment>/report/. Every seed's parameters are validated before the
    first notebook starts. Returns the run folder."""
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give 1 or more processes")
    from .config import experiment_seeds, run_dir_for
    from .loading import effective_parameters, load_experiment

    params_file = Path(params_file).resolve()
    cfg = load_experiment(params_file, overrides)  # everything is checked here, before the first notebook
    root = Path(run_root).resolve()  # absolute: the notebooks run in notebooks/
    run_dir = run_dir_for(cfg, root)
    stages = stages_for(cfg, only)
    header = f"# {params_file} with {list(overrides) or 'no overrides'}"
    effective = effective_parameters(params_file, overrides)
    if cfg.seeds is None:
        _write_params(run_dir, header, effective)
        _run_notebooks(run_dir, stages, root, force, log, cfg.experiment)
    else:
        seeds = experiment_seeds(cfg)
        runs = {}
        for seed in seeds:  # all written and validated first: a bad seed fails before any notebook runs
            path = _write_params(run_dir / f"seed{seed}", f"{header}, seed {seed} of {seeds}",
                                 seed_parameters(effective, seed))
            runs[seed] = run_dir_for(load_experiment(path), root)
        if workers > 1 and len(seeds) > 1:
            _run_seed_processes({s: runs[s] / "params.yaml" for s in seeds}, root, only, force, workers, log)
        else:
            for k, seed in enumerate(seeds, 1):
                log(f"seed {seed} ({k}/{len(seeds)})")
                _run_notebooks(runs[seed], stages, root, force, log, f"{cfg.experiment} seed {seed}")
        if all((d / "report" / "report.md").exists() for d in runs.values()):
            from .seed_summary import write_seed_summary

            write_seed_summary(cfg, runs, run_dir / "report")
    report = run_dir / "report" / "report.md"
    log(f"report: {report if report.exists() else run_dir / 'report'}")
    return run_dir


def _run_seed_processes(files: dict[int, Path], run_root: Path, only, force: bool, workers: int, log) -> None:
    """Each seed's sequence in its own process (`workers` at once, one torch thread each: small torch ops do not
    scale with threads, and two two-thread processes on 2 cores run ~7x slower); their lines come out prefixed
    with the seed. A failed seed stops the run after the others finish (they stay done for the resume)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    extra = [a for o in (only or []) for a in ("--only", o)] + (["--force"] if force else [])
    pending, running = list(files.items()), []

    def pump(seed, proc):
        for line in proc.stdout:
            log(f"[seed {seed}] {line.rstrip()}")

    while pending or running:
        while pending and len(running) < workers:
            seed, path = pending.pop(0)
            cmd = [sys.executable, "-m", "mima_lib.experiment.run", str(path), "--run-root", str(run_root), *extra]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            reader = threading.Thread(target=pump, args=(seed, proc), daemon=True)
            reader.start()
            running.append((seed, proc, reader))
        time.sleep(0.5)
        for job in list(running):
            seed, proc, reader = job
            if proc.poll() is None:
                continue
            reader.join()
            running.remove(job)
            if proc.returncode != 0:
                for _, other, r in running:
                    other.wait()
                    r.join()
                raise RuntimeError(f"seed {seed} failed (its lines above name the notebook and cell); rerun the "
                                   "same command to resume: finished stages of every seed are kept")


def _write_params(run_dir: Path, header: str, data: dict) -> Path:
    """The effective parameter file every notebook of this run reads: runs/<experiment>[/seed<k>]/params.yaml."""
    import yaml

    from ..method.tensor_io import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "params.yaml", header + "\n" + yaml.safe_dump(data, sort_keys=False))
    return run_dir / "params.yaml"


def _run_notebooks(run_dir: Path, stages: list[str], run_root: Path, force: bool, log, label: str) -> None:
    import papermill as pm

    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    params = dict(params_file=str(run_dir / "params.yaml"), run_root=str(run_root), force=force)
    log(f"experiment {label!r}: {len(stages)} notebooks -> {run_dir}")
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params_file")
    ap.add_argument("--only", action="append", help="run only notebooks whose name starts with this (repeatable)")
    ap.add_argument("--force", action="store_true", help="recompute stages whose outputs already exist")
    ap.add_argument("--run-root", default="runs")
    ap.add_argument("--workers", type=int, default=1,
                    help="with `seeds:` run this many seeds at once, each a process with one torch thread")
    ap.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override one setting of the file (repeatable), validated like the file")
    args = ap.parse_args(argv)
    try:
        run_sequence(args.params_file, args.only, args.force, args.run_root, overrides=args.set,
                     workers=args.workers)
    except (ConfigError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
