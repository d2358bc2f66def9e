"""Concept-parallel MIMA (mima_lib.method.distributed): two CPU processes (gloo) started by `accelerate launch`
split three concepts and must give the single-process result: the same first-step gradient, the same
per-step losses and the same weights after two steps, identical on both processes.

Tolerances: the processes sum partial results in another order than one process does, so float64 runs agree
to ~1e-10 and float32 ones to rounding (gradients: measured <= 1.4e-6, 6.5e-6 for float32 central
differences, which divide rounding by the finite-difference step; weights: within a few float32 ulps).
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import dist_immunize as D  # noqa: E402

from mima_lib.method.distributed import TorchComm  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(HELPERS / "dist_immunize.py"), str(out), *D.VARIANTS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {v: [torch.load(out / f"{v}_rank{r}.pt", weights_only=False) for r in (0, 1)] for v in D.VARIANTS}


def _rel(a: dict, b: dict) -> float:
    num = sum((a[k] - b[k]).double().pow(2).sum() for k in b)
    return float(num.sqrt() / sum(v.double().pow(2).sum() for v in b.values()).sqrt())


@pytest.mark.parametrize("variant", list(D.VARIANTS))
def test_two_processes_equal_one(launched, variant):
    r0, r1 = launched[variant]
    assert r0["world"] == r1["world"] == 2
    for k in r0["params"]:  # every process applies the same reduced gradient: identical weights
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    grad = D.one_gradient(variant)
    tol = 1e-4 if variant == "o2_xattn_central_f32" else 1e-5
    assert _rel(r0["grad"], grad) < tol, f"first-step gradient differs by {_rel(r0['grad'], grad):.2e}"
    before, single = D.run_single(variant)
    float64 = D.VARIANTS[variant]["dtype"] == "float64"
    assert r0["losses"] == pytest.approx(single.losses, rel=1e-9 if float64 else 1e-5)
    if float64:  # the update (weights after - before) to 1e-5
        update = {k: single.params[k] - before[k] for k in single.params}
        got = {k: r0["params"][k] - before[k] for k in single.params}
        assert _rel(got, update) < 1e-5
    else:  # float32 weights: the difference is parameter rounding
        diff = max(float((r0["params"][k] - single.params[k]).abs().max()) for k in single.params)
        assert diff < 1e-5, diff


def test_torch_comm_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="accelerate launch"):
        TorchComm()


def test_immunize_distributed_in_one_process_is_immunize():
    """Without a launcher the accelerator has one process: the same as immunize() with hypergrad='hvp'."""
    from accelerate import Accelerator

    from mima_lib.method.distributed import immunize_distributed

    pipe, data, reg, cfg = D.problem("o1_xattn_adamw")
    res = immunize_distributed(pipe, data, reg, "artwork", cfg, reg_captions=D.word_captions(), progress=False,
                               accelerator=Accelerator(cpu=True))
    _, single = D.run_single("o1_xattn_adamw")
    assert res.losses == single.losses
    for k, v in single.params.items():
        assert torch.equal(v, res.params[k]), k
    pipe, data, reg, cfg = D.problem("o1_xattn_adamw")
    cfg.hypergrad = "autograd"
    with pytest.raises(ValueError, match="needs hypergrad='hvp'"):
        immunize_distributed(pipe, data, reg, "artwork", cfg, progress=False, accelerator=Accelerator(cpu=True))
