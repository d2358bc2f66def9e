"""The data stage (01) of one experiment, in its own process: the kill-and-resume test's subject.

    python tests/helpers/data_small.py PARAMS_YAML RUN_ROOT [PAUSE_BEFORE_EACH_GENERATION]

The pause (seconds, default 0) only slows the run down, so that the test can kill it between two parts;
the images do not depend on it.
"""
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from mima_lib.experiment import stages  # noqa: E402
from mima_lib.experiment.stages import data as stage_data  # noqa: E402
from mima_lib.experiment.config import run_dir_for  # noqa: E402
from mima_lib.experiment.loading import load_experiment  # noqa: E402


def main(params: Path, run_root: Path, pause: float) -> None:
    if pause:
        generate = stage_data.generate

        def slow_generate(*args, **kwargs):
            time.sleep(pause)
            return generate(*args, **kwargs)

        stage_data.generate = slow_generate
    cfg = load_experiment(params)
    stages.make_data(cfg, run_dir_for(cfg, run_root))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
