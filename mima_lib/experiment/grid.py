"""The seed grid: the whole experiment once per seed, every attack column a cell, one report over seeds.

    python -m mima_lib.experiment.grid papermill_params/toy_paper_objects.yaml            # run or resume
    python -m mima_lib.experiment.grid FILE --set seeds=[0,1] --set attack.n_images=4     # override keys
    python -m mima_lib.experiment.grid FILE --workers 2    # cells in 2 processes (one torch thread each)
    python -m mima_lib.experiment.grid FILE --report-only  # rebuild the report from the cells alone

Per seed (`seeds: [...]` of the file, else its `seed`): stages 01-03 (data draws, erasure, immunization) into
runs/<experiment>/seed<k>/, then the cells (grid_cells.py): each attack of attack.methods and each stronger
variant of grid.variants on every model and target, the harmless fine-tune (evaluate.benign_concepts) and
utility. A cell that finished with the same settings is skipped, so a killed grid resumes where it stopped;
the report (grid_report.py) is rebuilt from the cells' cell.json files at the end of every run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from .dataclass_yaml import ConfigError


def validate_grid(cfg) -> list:
    """Checks of the grid's own keys, before any work: seeds, variants, the report step, utility. Returns the
    attack cells of one seed."""
    from .variants import attack_cells

    grid_seeds(cfg)  # some, distinct, non-negative (config.experiment_seeds)
    cells = attack_cells(cfg)
    for cell in cells:
        steps = _snapshot_steps(cfg, cell)
        if cfg.grid.report_step not in steps:
            raise ConfigError(f"grid.report_step: {cfg.grid.report_step} is not a snapshot step of {cell.name} "
                              f"({steps}); add it to attack.settings.{cell.attack}.snapshot_steps")
    if cfg.grid.long_step is not None and "lora" in cfg.attack.methods \
            and cfg.grid.long_step not in _snapshot_steps(cfg, cells[cfg.attack.methods.index("lora")]):
        raise ConfigError(f"grid.long_step: {cfg.grid.long_step} is not a snapshot step of lora "
                          f"({_snapshot_steps(cfg, cells[cfg.attack.methods.index('lora')])})")
    if cfg.utility_concepts and not (cfg.is_toy and all(cfg.concept(c).toy for c in cfg.utility_concepts)):
        raise ConfigError("utility_concepts: the grid measures utility with the toy world's oracle; on a real "
                          "model run the notebook sequence (mima_lib.experiment.run), whose report has CLIP utility")
    return cells


def _snapshot_steps(cfg, cell) -> list[int]:
    from ..attacks import make_settings
    from .config import attack_defaults
    from .variants import cell_settings

    s = make_settings(cell.attack, cell_settings(cfg, cell, 0), attack_defaults(cfg))
    return [int(x) for x in s.snapshot_steps if x <= s.steps]


def grid_seeds(cfg) -> list[int]:
    from .config import experiment_seeds

    return experiment_seeds(cfg)


def load_grid(params_file, overrides=()):
    """The validated experiment of a grid file and its attack cells; every error before any work."""
    from .loading import load_experiment

    cfg = load_experiment(params_file, overrides)
    try:
        return cfg, validate_grid(cfg)
    except ConfigError as err:
        raise ConfigError(f"{params_file}: {err}") from None


def grid_root(cfg, run_root="runs") -> Path:
    from .config import run_dir_for

    return run_dir_for(cfg, run_root)


def seed_jobs(cfg, cells, root: Path, seed: int) -> list[tuple]:
    """(name, settings, work(folder)) of every cell of one seed: the attack cells, the harmless fine-tune and
    utility (when the file asks for them)."""
    from . import grid_cells as gc

    scfg, run_dir = gc.seed_config(cfg, seed), gc.seed_dir(root, seed)
    jobs = [(c.name, gc.attack_cell_settings(scfg, c), lambda f, c=c: gc.run_attack_cell(scfg, run_dir, f, c))
            for c in cells]
    if cfg.evaluate.benign_concepts:
        jobs.append(("benign-lora", gc.benign_cell_settings(scfg), lambda f: gc.run_benign_cell(scfg, run_dir, f)))
    if cfg.utility_concepts:
        jobs.append(("utility", gc.utility_settings(scfg), lambda f: gc.run_utility_cell(scfg, run_dir, f)))
    return jobs


def run_seed(cfg, cells, root: Path, seed: int, force: bool = False, log=print, after_cell=None,
             only: set | None = None, prepare_only: bool = False) -> dict:
    """Every cell of one seed (or those named in `only`); finished cells are skipped (force: redone).
    after_cell(name) is called after each cell that ran (tests use it to stop a grid mid-way). Returns
    {cell: 'ran' | 'skipped'}."""
    from . import grid_cells as gc

    scfg, run_dir = gc.seed_config(cfg, seed), gc.seed_dir(root, seed)
    status, prepared = {}, False
    if prepare_only:
        _prepare(scfg, run_dir, root, seed)
        return status
    for name, settings, work in seed_jobs(cfg, cells, root, seed):
        if only is not None and name not in only:
            continue
        folder = gc.cell_dir(root, seed, name)
        if not force and gc.cell_done(folder, settings):
            status[name] = "skipped"
            continue
        if not prepared:
            _prepare(scfg, run_dir, root, seed)
            prepared = True
        t0 = time.time()
        (folder / "manifest.json").unlink(missing_ok=True)  # an unfinished (or forced) cell is not finished
        if force:
            gc.clear_cell_runs(run_dir, name, seed)
        work(folder)
        status[name] = "ran"
        log(f"seed {seed}: cell {name} done in {time.time() - t0:.0f} s")
        if after_cell is not None:
            after_cell(name)
    return status


def _prepare(scfg, run_dir: Path, root: Path, seed: int) -> None:
    from . import grid_cells as gc

    t0 = time.time()
    gc.prepare(scfg, run_dir)
    gc.record_prepare(root, seed, time.time() - t0)


def run_grid(params_file, run_root="runs", overrides=(), force: bool = False, workers: int = 1, log=print,
             after_cell=None) -> Path:
    """Run (or resume) every seed's cells, then rebuild the report. Returns the report's path."""
    from ..method.tensor_io import atomic_write_text
    from .grid_report import write_grid_report
    from .loading import effective_parameters

    import yaml

    cfg, cells = load_grid(params_file, overrides)
    root = grid_root(cfg, run_root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "params.yaml", f"# {Path(params_file).resolve()} with {list(overrides) or 'no overrides'}"
                      "\n" + yaml.safe_dump(effective_parameters(params_file, overrides), sort_keys=False))
    seeds = grid_seeds(cfg)
    log(f"grid {cfg.experiment!r}: seeds {seeds}, cells {[c.name for c in cells]} -> {root}")
    t0 = time.time()
    if workers > 1 and len(seeds) > 1:
        _run_workers(root / "params.yaml", run_root, cfg, cells, root, seeds, force, workers, log)
    else:
        for seed in seeds:
            run_seed(cfg, cells, root, seed, force, log, after_cell)
    log(f"grid: all cells in {time.time() - t0:.0f} s")
    return write_grid_report(cfg, root, cells)


def _run_workers(params: Path, run_root, cfg, cells, root: Path, seeds: list[int], force: bool, workers: int,
                 log) -> None:
    """`workers` processes at once, one torch thread each: first stages 01-03 of every seed (one process per
    seed), then every unfinished (seed, cell), longest attacks first, so that no core idles while one seed's
    long cells run. Each process writes only its own cell's folders (and its seed's attack runs)."""
    from ..attacks import make_settings
    from . import grid_cells as gc
    from .config import attack_defaults

    base = [sys.executable, "-m", "mima_lib.experiment.grid", str(params), "--run-root", str(run_root)]
    todo = []
    for s in seeds:
        for name, settings, _ in seed_jobs(cfg, cells, root, s):
            if force or not gc.cell_done(gc.cell_dir(root, s, name), settings):
                a = settings.get("attack_settings")
                cost = make_settings(settings["attack"], a, attack_defaults(cfg)).steps if a is not None else 0
                todo.append((-cost, s, name))
    unprepared = sorted({s for _, s, _ in todo})
    _pool([(f"seed {s} stages 01-03", base + ["--only-seed", str(s), "--prepare-only"]) for s in unprepared],
          workers, log)
    _pool([(f"seed {s} cell {name}", base + ["--only-seed", str(s), "--only-cell", name]
            + (["--force"] if force else [])) for _, s, name in sorted(todo)], workers, log)


def _pool(jobs: list[tuple[str, list[str]]], workers: int, log) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIMA_GRID_THREADS": "1"}
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < workers:
            label, cmd = pending.pop(0)
            running.append((label, subprocess.Popen(cmd, env=env), time.time()))
        time.sleep(1)
        for job in list(running):
            label, proc, t0 = job
            if proc.poll() is None:
                continue
            running.remove(job)
            if proc.returncode != 0:
                for _, other, _ in running:
                    other.wait()  # let the others finish their cells: they stay done for the resume
                raise RuntimeError(f"grid: {label} failed (exit {proc.returncode}); rerun the same command to "
                                   "resume, or run it alone with --only-seed/--only-cell to see why")
            log(f"grid: {label} done in {time.time() - t0:.0f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params_file")
    ap.add_argument("--run-root", default="runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override one setting of the file (repeatable), validated like the file")
    ap.add_argument("--force", action="store_true", help="redo cells that already finished")
    ap.add_argument("--workers", type=int, default=1, help="seeds run in this many processes at once")
    ap.add_argument("--only-seed", type=int, default=None, help="run one seed's cells and no report (a worker)")
    ap.add_argument("--only-cell", action="append", default=None, help="with --only-seed: run only this cell")
    ap.add_argument("--prepare-only", action="store_true", help="with --only-seed: only stages 01-03")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from the finished cells")
    args = ap.parse_args(argv)
    if os.environ.get("MIMA_GRID_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["MIMA_GRID_THREADS"]))
    try:
        if args.report_only or args.only_seed is not None:
            from .grid_report import write_grid_report

            cfg, cells = load_grid(args.params_file, args.set)
            root = grid_root(cfg, args.run_root)
            if args.only_seed is not None:
                if args.only_seed not in grid_seeds(cfg):
                    raise ConfigError(f"--only-seed {args.only_seed} is not in seeds {grid_seeds(cfg)}")
                run_seed(cfg, cells, root, args.only_seed, args.force,
                         only=set(args.only_cell) if args.only_cell else None, prepare_only=args.prepare_only)
            else:
                print(write_grid_report(cfg, root, cells))
        else:
            print(run_grid(args.params_file, args.run_root, args.set, args.force, args.workers))
    except (ConfigError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
