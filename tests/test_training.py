"""The shared training loop resumes bit for bit, also after a real kill of the training process."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from mima_lib.method.training import TrainConfig, lr_factor, train

HELPER = Path(__file__).parent / "helpers" / "train_small.py"
ROOT = Path(__file__).resolve().parent.parent


def _quadratic_problem():
    w = torch.nn.Parameter(torch.zeros(5))
    target = torch.arange(5.0)

    def step_fn(step, gen):
        noise = torch.randn(5, generator=gen) * 0.1  # sampling must come from the loop's generator
        return ((w - target - noise) ** 2).sum()

    return w, step_fn


def test_resume_in_process_equals_uninterrupted(tmp_path):
    w, fn = _quadratic_problem()
    full = train(fn, {"w": w}, TrainConfig(steps=10, lr=0.1, seed=1), progress=False)
    reference = w.detach().clone()
    w2, fn2 = _quadratic_problem()
    train(fn2, {"w": w2}, TrainConfig(steps=6, lr=0.1, seed=1, checkpoint_every=3), tmp_path, progress=False)
    (tmp_path / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")  # what a kill mid-save leaves
    w3, fn3 = _quadratic_problem()  # a fresh process would start from scratch like this
    resumed = train(fn3, {"w": w3}, TrainConfig(steps=10, lr=0.1, seed=1, checkpoint_every=3), tmp_path,
                    progress=False)
    assert resumed.resumed_from == 6
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    assert torch.equal(w3.detach(), reference)
    assert resumed.losses == full.losses


def test_kept_tensors_resume_with_the_weights(tmp_path):
    """An EMA copy the caller updates (the toy build's UNet) is saved with every checkpoint and restored."""
    def run(steps, folder):
        w, fn = _quadratic_problem()
        ema = {"w": torch.zeros(5)}

        def average(step):
            with torch.no_grad():
                ema["w"].lerp_(w, 0.5)

        train(fn, {"w": w}, TrainConfig(steps=steps, lr=0.1, seed=1, checkpoint_every=2), folder, progress=False,
              on_step=average, keep=ema)
        return ema["w"]

    reference = run(8, tmp_path / "a")
    run(4, tmp_path / "b")
    resumed = run(8, tmp_path / "b")
    assert torch.equal(resumed, reference) and resumed.abs().sum() > 0


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, schedule="cosine")
    assert lr_factor(0, cfg) == 0.1 and lr_factor(9, cfg) == 1.0
    assert abs(lr_factor(55, cfg) - 0.5) < 1e-9 and lr_factor(100, cfg) < 1e-9


def _run(out, steps, pause=0.0):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(HELPER), str(out), str(steps), str(pause)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_killed_run_resumes_bitwise(tmp_path):
    steps = 12
    clean = _run(tmp_path / "clean", steps)
    assert clean.wait(timeout=300) == 0, clean.stderr.read().decode()[-2000:]
    victim = _run(tmp_path / "killed", steps, pause=0.3)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it mid-run, after a few checkpoints were written
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["step"] >= 4:
            break
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "final.pt").exists(), "the run finished before it could be killed"
    resumed = _run(tmp_path / "killed", steps)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    a = torch.load(tmp_path / "clean" / "final.pt", weights_only=False)
    b = torch.load(tmp_path / "killed" / "final.pt", weights_only=False)
    assert a["losses"] == b["losses"]
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k


ATTACK = Path(__file__).parent / "helpers" / "attack_small.py"


def test_killed_attack_resumes_with_identical_weights_and_snapshots(tmp_path):
    from mima_lib.method.tensor_io import load_tensors

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = lambda out: subprocess.Popen([sys.executable, str(ATTACK), str(out)], env=env,  # noqa: E731
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    clean = run(tmp_path / "clean")
    assert clean.wait(timeout=600) == 0, clean.stderr.read().decode()[-2000:]
    victim = run(tmp_path / "killed")
    ckpt = tmp_path / "killed" / "checkpoint" / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        try:
            if ckpt.exists() and torch.load(ckpt, weights_only=False)["step"] >= 12:
                break
        except (EOFError, RuntimeError):  # read while being replaced: try again
            pass
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "final.safetensors").exists(), "the attack finished before it was killed"
    resumed = run(tmp_path / "killed")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    a, b = load_tensors(tmp_path / "clean" / "final.safetensors"), load_tensors(tmp_path / "killed" / "final.safetensors")
    assert sorted(a) == sorted(b) and any(k.startswith("snap40") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
