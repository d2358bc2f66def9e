"""Time and peak memory of a plain fine-tuning step and of MIMA outer steps for N concepts.

    python benchmarks/bench_immunize.py                        # CPU: the embedded toy UNet
    python benchmarks/bench_immunize.py --device cuda --bf16   # GPU: toy and an SD-v1.4-sized UNet

Methods (one outer step each = the MIMA step of mima_lib.method.immunize.bilevel_loss + the AdamW update of S_u):
  plain         one AdamW fine-tuning step of the whole UNet at the same batch (the reference)
  o1-autograd   first order, every adapted copy held at once (hypergrad='autograd', order 1)
  o1-stream     first order, concept by concept (hypergrad='hvp', order 1)
  o2-autograd   exact, double backward through all inner steps, plain attention (the original path)
  o2-central    exact up to O(eps^2), HVP by central differences, concept by concept (hypergrad='hvp')
  o2-forward    exact up to O(eps), HVP by forward differences (one gradient pass fewer)
  o2-jvp        exact, HVP by forward-over-reverse autodiff (plain attention in those passes)

Settings are the paper's (S_l = whole UNet, S_u = attn2, Custom Diffusion merge on attn2 K/V, prior
preservation with the instance loss in one forward) with synthetic data: random latents, text states and
regularization-caption rows, the UNet's own random or trained weights. ``--batch`` images per concept (and
per regularization prompt); the plain step uses the same batch.

Columns: s/step (the fastest of ``--steps`` timed steps after ``--warmup``), s/concept = s/step / N,
x plain = s/concept / the s/step of a plain step timed in the same process right after the row's steps (so
that both see the same load on a shared machine), peak = torch.cuda.max_memory_allocated over the warmup
and timed steps (weights included) on a GPU; on the CPU the peak resident set
size of a fresh worker process per row (``--isolate``, default on CPU) minus its size before the first step,
x plain = peak / plain peak. A method that runs out of memory (or exceeds ``--max-step-seconds``) is not
tried for larger N. ``--check`` adds the relative error of each exact method's S_u gradient against
o2-autograd (same weights, same draws, same precision) for N = 1 and 2.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

METHODS = ("plain", "o1-autograd", "o1-stream", "o2-autograd", "o2-central", "o2-forward", "o2-jvp")
EXACT = ("o2-central", "o2-forward", "o2-jvp")


# ---------------------------------------------------------------------------------------------- models
def sd14_unet(device):
    """Stable Diffusion v1-4's UNet2DConditionModel configuration (859.5 M parameters), random weights."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)


def load_model(name: str, device):
    """(unet, number of text tokens) for 'toy' (the embedded trained toy UNet) or 'sd14'."""
    if name == "toy":
        from mima_lib.toy.model import load_toy_pipeline

        pipe = load_toy_pipeline()
        return pipe.unet.to(device), pipe.tokenizer.model_max_length
    if name == "sd14":
        return sd14_unet(device), 77
    raise ValueError(f"unknown model {name!r}; use 'toy' or 'sd14'")


def synthetic_problem(unet, n: int, cfg, tokens: int, seed: int = 0, images: int = 8, rows: int = 4):
    """A mima_lib.method.problem.Problem with random data: ``images`` latents per concept, text states, the
    first ``rows`` state rows of each concept as its merge targets, 600 regularization rows, one prior
    prompt with ``images`` latents."""
    from mima_lib.method.problem import Problem
    from mima_lib.method.paramsets import select_params
    from mima_lib.toy.model import training_scheduler

    g = torch.Generator().manual_seed(seed)
    dev, dt = unet.device, unet.dtype
    c, hw, d = unet.config.in_channels, unet.config.sample_size, unet.config.cross_attention_dim

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dev, dt)

    states = randn(n, tokens, d)
    return Problem(unet, training_scheduler(), cfg, [f"concept {i}" for i in range(n)],
                   [randn(images, c, hw, hw) for _ in range(n)], states, [states[i, :rows] for i in range(n)],
                   randn(600, d), ["prior"], [randn(images, c, hw, hw)], randn(1, tokens, d),
                   dict(unet.named_parameters()), select_params(unet, cfg.inner_params, "inner"),
                   select_params(unet, cfg.outer_params, "outer"),
                   frozenset(select_params(unet, cfg.outer_params, "outer")))


def mima_config(method: str, batch: int):
    from mima_lib.method.immunize import ImmunizeConfig

    order = 1 if method.startswith("o1") else 2
    hyper = "autograd" if method.endswith("autograd") else "hvp"
    scheme = method.split("-")[1] if method in EXACT else "central"
    return ImmunizeConfig(method="mima", order=order, hypergrad=hyper, hvp_scheme=scheme, inner_params="unet",
                          outer_params="xattn", batch_size=batch, prior_weight=1.0, prior_on="merged",
                          inner_lr=1e-5, outer_lr=3e-5, optimizer="adamw", clip_grad=1.0, diagnose_every=0)


# ---------------------------------------------------------------------------------------------- one row
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _autocast(device, bf16: bool):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else nullcontext()


def make_step(method: str, unet, n: int, batch: int, tokens: int, device, bf16: bool):
    """A zero-argument callable running one step of ``method``, and the problem (None for plain)."""
    from mima_lib.method.diffusion import draw_noise, noise_loss
    from mima_lib.method.bilevel import plain_attention
    from mima_lib.method.immunize import bilevel_loss
    from mima_lib.toy.model import training_scheduler

    if method == "plain":
        unet.requires_grad_(True)
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
        sched = training_scheduler()
        g = torch.Generator().manual_seed(0)
        c, hw, d = unet.config.in_channels, unet.config.sample_size, unet.config.cross_attention_dim
        lat = torch.randn(batch, c, hw, hw, generator=g).to(device)
        states = torch.randn(batch, tokens, d, generator=g).to(device)

        def step(i):
            opt.zero_grad(set_to_none=True)
            with _autocast(device, bf16):
                loss = noise_loss(unet, sched, lat, states, *draw_noise(lat, 1000, g), reduction="mean")
            loss.backward()
            opt.step()

        return step, None
    cfg = mima_config(method, batch)
    prob = synthetic_problem(unet, n, cfg, tokens)
    unet.requires_grad_(False)
    for k in prob.outer_names:
        prob.params[k].requires_grad_(True)
    opt = torch.optim.AdamW([prob.params[k] for k in prob.outer_names], lr=cfg.outer_lr)
    gen = torch.Generator().manual_seed(0)

    def step(i):
        opt.zero_grad(set_to_none=True)
        with plain_attention(unet, method == "o2-autograd"), _autocast(device, bf16):
            loss, _ = bilevel_loss(prob, i, gen)
            if loss.requires_grad:
                loss.backward()
        torch.nn.utils.clip_grad_norm_([prob.params[k] for k in prob.outer_names], cfg.clip_grad)
        opt.step()

    return step, prob


def _time(step, args) -> float:
    """Fastest of ``args.steps`` timed steps after ``args.warmup`` (robust to other jobs on the machine)."""
    for i in range(args.warmup):
        step(i)
    _sync(args.device)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(args.warmup + i)
        _sync(args.device)
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(model: str, method: str, n: int, args) -> dict:
    """One table row, in this process."""
    device = args.device
    torch.manual_seed(0)
    unet, tokens = load_model(model, device)
    unet.eval()
    row = {"model": model, "method": method, "N": n, "batch": args.batch, "bf16": args.bf16,
           "device": str(device), "params_M": sum(p.numel() for p in unet.parameters()) / 1e6}
    cuda = torch.device(device).type == "cuda"
    try:
        step, _ = make_step(method, unet, n, args.batch, tokens, device, args.bf16)
        base = _rss_bytes()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        row["s_per_step"] = _time(step, args)
        if cuda:
            row["peak_bytes"] = torch.cuda.max_memory_allocated()
        else:  # the high-water mark of this process above its size before the first step
            row["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        if method != "plain":  # a plain step in the same process, right after: the same machine load
            del step
            plain, _ = make_step("plain", unet, n, args.batch, tokens, device, args.bf16)
            row["plain_s_per_step"] = _time(plain, args)
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    finally:
        del unet
        if cuda:
            torch.cuda.empty_cache()
    return row


def measure_isolated(model: str, method: str, n: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps([model, method, n]),
           "--device", str(args.device), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)] + (["--bf16"] if args.bf16 else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"model": model, "method": method, "N": n, "error": "OOM" if "out of memory" in err else err[:80]}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------- check
def check_accuracy(model: str, args) -> list[dict]:
    """Relative error of every exact method's S_u gradient against o2-autograd (and first order's)."""
    from mima_lib.method.bilevel import plain_attention
    from mima_lib.method.immunize import bilevel_loss

    rows = []
    torch.manual_seed(0)
    unet, tokens = load_model(model, args.device)
    unet.eval()
    for n in (1, 2):
        grads = {}
        for method in ("o2-autograd", "o1-autograd") + EXACT:
            cfg = mima_config(method, args.check_batch)
            prob = synthetic_problem(unet, n, cfg, tokens)
            unet.requires_grad_(False)
            for k in prob.outer_names:
                prob.params[k].requires_grad_(True)
                prob.params[k].grad = None
            try:
                with plain_attention(unet, method == "o2-autograd"), _autocast(args.device, args.bf16):
                    loss, _ = bilevel_loss(prob, 0, torch.Generator().manual_seed(0))
                    if loss.requires_grad:
                        loss.backward()
                grads[method] = torch.cat([prob.params[k].grad.double().flatten() for k in prob.outer_names])
            except torch.OutOfMemoryError:
                grads[method] = None
            for k in prob.outer_names:
                prob.params[k].grad = None
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
        ref = grads["o2-autograd"]
        for method, g in grads.items():
            if method == "o2-autograd":
                continue
            err = float((g - ref).norm() / ref.norm()) if g is not None and ref is not None else float("nan")
            rows.append({"model": model, "N": n, "method": method, "rel_err_vs_o2_autograd": err})
    return rows


# ---------------------------------------------------------------------------------------------- table
def fmt_bytes(b) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def table(rows: list[dict]) -> str:
    out = ["| model | method | N | s/step | s/concept | x plain | peak memory | x plain |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    plain = {r["model"]: r for r in rows if r["method"] == "plain" and "error" not in r}
    for r in rows:
        p = plain.get(r["model"])
        if "error" in r:
            out.append(f"| {r['model']} | {r['method']} | {r['N']} | {r['error']} | | | | |")
            continue
        if r["method"] == "plain":
            out.append(f"| {r['model']} | plain | - | {r['s_per_step']:.3f} | | 1.00 | {fmt_bytes(r['peak_bytes'])} "
                       f"| 1.00 |")
            continue
        per = r["s_per_step"] / r["N"]
        ref = r.get("plain_s_per_step") or (p["s_per_step"] if p else None)
        xt = f"{per / ref:.2f}" if ref else ""
        xm = f"{r['peak_bytes'] / p['peak_bytes']:.2f}" if p and p["peak_bytes"] > 0 else ""
        out.append(f"| {r['model']} | {r['method']} | {r['N']} | {r['s_per_step']:.3f} | {per:.3f} | {xt} | "
                   f"{fmt_bytes(r['peak_bytes'])} | {xm} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=None, help="toy, sd14 (default: toy on CPU, both on a GPU)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--n", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="numbers of concepts")
    ap.add_argument("--batch", type=int, default=4, help="images per concept (and of the plain step)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="one fresh process per row (default: on CPU, where it is how peak RSS is measured)")
    ap.add_argument("--max-step-seconds", type=float, default=120.0,
                    help="do not try larger N for a method whose step took longer than this")
    ap.add_argument("--check", action="store_true", help="also report gradient errors against o2-autograd")
    ap.add_argument("--check-batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")))
    ap.add_argument("--json", default=None, help="write every row to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        model, method, n = json.loads(args.worker)
        print(json.dumps(measure(model, method, n, args)), flush=True)
        return 0
    cuda = torch.device(args.device).type == "cuda"
    models = args.models or (["toy", "sd14"] if cuda else ["toy"])
    isolate = (not cuda) if args.isolate is None else args.isolate
    run = measure_isolated if isolate else measure
    print(f"# device {args.device}{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, torch "
          f"{torch.__version__}, batch {args.batch}, bf16 {args.bf16}, {args.threads} thread(s), "
          f"{'isolated' if isolate else 'in-process'} rows", flush=True)
    rows, checks = [], []
    for model in models:
        for method in args.methods:
            for n in ([1] if method == "plain" else args.n):
                row = run(model, method, n, args)
                rows.append(row)
                print("  " + json.dumps(row), flush=True)
                if "error" in row or row["s_per_step"] > args.max_step_seconds:
                    break
        if args.check:
            checks += check_accuracy(model, args)
    print()
    print(table(rows))
    if checks:
        print("\n| model | N | method | rel. error of the S_u gradient vs o2-autograd |\n|---|---:|---|---:|")
        for c in checks:
            print(f"| {c['model']} | {c['N']} | {c['method']} | {c['rel_err_vs_o2_autograd']:.2e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "checks": checks, "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
