"""MIMA's outer step with memory flat in the number of concepts (``ImmunizeConfig(hypergrad='hvp')``).

The autograd path (:func:`mima_lib.method.bilevel.autograd_step`, ``hypergrad='autograd'``) keeps every concept's
inner step in one double-backward graph: memory grows with N. This path streams the concepts instead and
writes the exact gradient into ``.grad`` (the contract of :func:`mima_lib.method.training.train`). With theta the
current weights, S_l the attacked set (G) and S_u the updated set (U):

1. inner steps, one concept (one "unit") at a time, without a graph: delta_n = theta'_n - theta on G.
   Only what the merge needs is kept: the running sum of delta_n for mean-merged parameters and the
   targets V_n = C_n W'_n^T (a few rows per attn2 K/V layer) for the closed-form merge.
2. theta* = Merge(...) and g* = dJ/dtheta*, accumulated chunk by chunk over the upper batches (ordinary
   backward, fused attention allowed); with ``prior_on='immunized'`` the prior's gradient at theta too.
3. g* is pulled back through the merge: autograd on the small closed form gives dJ/dW0 and dJ/dV, hence
   the cotangent v_n = dJ/dtheta'_n of every unit (rank <= r_n for K/V; g*/N for mean-merged parameters).
4. (dtheta'_n/dtheta)^T v_n = v_n + H_n D_n^T v_n, where theta'_n = theta + D_n(grad L_n) (D_n = -alpha_nk
   per tensor k, alpha_nk the attacker's step size, held constant as in paramsets.inner_step_size; the
   self-adjoint map g -> -alpha_nk g A^T A for one LoRA step) and H_n is the Hessian of unit n's inner loss. Only its rows on U are needed: the Hessian-vector product is taken on grad_U, by
   ``hvp_scheme='central'``  (grad_U L_n(theta + eps u) - grad_U L_n(theta - eps u)) / (2 eps), two passes,
   ``'forward'``  (grad_U L_n(theta + eps u) - grad_U L_n(theta)) / eps, one pass (grad_U L_n(theta) comes
                  free with step 1),
   ``'jvp'``      forward-over-reverse (torch.func.jvp of the gradient): exact with no step size to choose,
                  ~2-3x the cost of a gradient, the plain attention processor in these passes only.
   Every pass replays the unit's own noise, timesteps and LoRA draws.

Precision: in float32 the finite-difference schemes agree with the autograd hypergradient to ~1e-4
(central) / ~1e-3 (forward) even when the second-order part dominates (tests/test_hypergrad.py); under
bfloat16 autocast a weight perturbation small enough for the Taylor expansion is mostly rounded away, so
central differences lose about twice bf16's own error and forward differences more: use 'jvp' there
(it runs on a bf16 copy of the UNet and is as accurate as bf16 autograd).

Memory, whatever N: the model, one copy of S_l for theta* (step 2) or theta + eps u (step 4), one of
S_l u S_u for g*, one gradient, a few copies of S_u, and one concept's activations (``concept_chunk``
concepts in step 2).
Randomness is drawn in exactly the order of :func:`bilevel_loss`, so both paths optimise the same objective
(tests/test_hypergrad.py compares them in float64 and against central differences of J).

``order=1`` with ``hypergrad='hvp'`` is the streamed first-order step (steps 1-2; g* at theta* is applied
to theta): the same update as the autograd order-1 path without N copies of the adapted weights.

Logged per step: the simulated attack's relative move ||theta'_n - theta|| / ||theta|| (mean over units) and
the merged model's ||theta* - theta|| / ||theta||; with order 2 also the cosine of the first-order and exact
hypergradients and the second-order share ||exact - first|| / ||exact||.

Concept parallelism: every unit and every upper chunk has an owner rank (round-robin); a :class:`Comm`
sums the merge inputs, g*, the perturbation norms and the final gradient across ranks
(:mod:`mima_lib.method.distributed` provides the torch.distributed one). Every rank draws all random numbers,
so each unit sees the noise it would see in a single process.

One deviation from the autograd path: for ``inner_params='lora'`` an adapter matrix A is drawn for every
LoRA target, also one the inner loss does not reach (inner_step skips those); diffusers UNets have none.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .bilevel import functional_unet, hypergradient_agreement, plain_attention, step_size
from .diffusion import noise_loss
from .hypergrad_plan import (LOCAL, Comm, MergePlan, Unit, add_into, compute_dtype_now, default_hvp_eps, draws,
                             grads_of, norms, replay)
from .merge import is_cross_attention_kv
from .paramsets import lora_A, lora_delta
from .problem import SCHEMES

__all__ = ["SCHEMES", "Comm", "LOCAL", "streamed_step", "default_hvp_eps"]


@torch.enable_grad()  # it takes gradients inside, also when called under no_grad
def streamed_step(prob, step: int, gen: torch.Generator, comm: Comm | None = None):
    """One outer step: fills ``.grad`` of the S_u parameters with dJ/dtheta_u and returns (J, extras), J the
    objective :func:`mima_lib.method.bilevel.autograd_step` returns, as a tensor without a graph."""
    comm = comm or LOCAL
    cfg = prob.cfg
    unet, P = prob.unet, prob.params
    G, U = list(prob.inner_names), list(prob.outer_names)
    Gset, Uset = set(G), set(U)
    second = cfg.order == 2
    scheme = cfg.hvp_scheme
    lora = cfg.inner_params == "lora"
    concepts, units, upper, chunks = draws(prob, step, gen)
    n_units = len(units)
    kv = [k for k in G if cfg.method == "mima" and is_cross_attention_kv(k)]
    kvset = set(kv)
    mean_keys = [k for k in G if k not in kvset]
    plan = MergePlan(prob, concepts, kv) if kv else None
    mine = [i for i in range(n_units) if comm.owns(i)]
    dev = P[G[0]].device

    # 1. inner steps, one unit at a time
    need = G + [k for k in U if k not in Gset] if (second and scheme == "forward") else G
    acc = {k: torch.zeros_like(P[k]) for k in mean_keys}  # sum_n delta_n
    V = {k: torch.zeros(sum(plan.sizes), P[k].shape[0], dtype=plan.cd, device=dev) for k in kv}
    grad_at_theta = {}  # sum over own units of grad_U L_n(theta), for the forward scheme
    sizes = [{} for _ in range(n_units)]  # the attacker's step size per unit and tensor (paramsets.inner_step_size)
    moves = torch.zeros(n_units, dtype=torch.float64)  # ||theta'_n - theta||^2 on S_l
    for i in mine:
        u = units[i]
        theta = {k: P[k].detach().requires_grad_(True) for k in need}
        per = noise_loss(functional_unet(unet, theta), prob.sched, u.latents, u.states, u.noise, u.t)
        grads = grads_of(per.mean(), theta)
        del theta, per
        with torch.no_grad():
            for k in G:
                g = grads.get(k)
                if g is None:
                    continue
                if lora:  # Adam scales B's gradient G A^T
                    A = lora_A(g, cfg.lora_rank, replay(u.lora_states[k]))
                    sizes[i][k] = step_size(prob, i, k, g @ A.T)
                    delta = lora_delta(g, sizes[i][k], cfg.lora_rank, replay(u.lora_states[k]))
                else:
                    sizes[i][k] = step_size(prob, i, k, g)
                    delta = g.mul(-sizes[i][k])
                moves[i] += float(delta.double().pow(2).sum())
                if k in kvset:
                    V[k][plan.rows(i)] = plan.targets(i, P[k] + delta)
                else:
                    acc[k].add_(delta)
            if second and scheme == "forward":
                add_into(grad_at_theta, {k: grads[k] for k in U if k in grads})
        del grads
    comm.all_reduce(list(acc.values()) + list(V.values()) + [moves])

    # 2. theta* and g* = dJ/dtheta*, chunk by chunk
    with torch.no_grad():
        star = {}
        for k in G:
            star[k] = plan.apply(P[k], V[k]) if k in kvset else acc.pop(k).div_(n_units).add_(P[k])
        for k in U:
            if k not in Gset:
                star[k] = P[k].detach()
    theta_sq = float(norms(P[k] for k in G).pow(2).sum())
    stats_moves = {"inner_move": float(moves.sqrt().mean()) / theta_sq ** 0.5,
                   "merged_move": float(norms(star[k] - P[k] for k in G).pow(2).sum()) ** 0.5 / theta_sq ** 0.5}
    leaf_names = (G + [k for k in U if k not in Gset]) if second else U
    for k in leaf_names:
        star[k] = star[k].detach().requires_grad_(True)
    at_theta = {k: P[k].detach().requires_grad_(True) for k in U}  # the prior on the immunized weights
    stats = torch.zeros(2 + len(concepts), dtype=torch.float64)  # J, prior, concept losses
    for j, ch in enumerate(chunks):
        if not comm.owns(j):
            continue
        lat, st, noise, t = upper[1] if ch.at == "theta" else upper[0]
        r = ch.rows
        params, leaves = (star, leaf_names) if ch.at == "star" else (at_theta, U)
        per = noise_loss(functional_unet(unet, params), prob.sched, lat[r], st[r], noise[r], t[r])
        obj = (per * ch.weights.to(per.device, per.dtype)).sum()
        # accumulate into .grad one parameter at a time (no second full gradient for later chunks)
        torch.autograd.backward(obj, inputs=[params[k] for k in leaves])
        stats[0] += float(obj.detach())
        per = per.detach()
        if ch.prior:
            stats[1] += float(per.sum())
        for n, rr in ch.concepts:
            stats[2 + n] += float(per[rr].mean())
        del per, obj
    gstar = {k: star[k].grad for k in leaf_names if star[k].grad is not None}
    direct = {k: v.grad for k, v in at_theta.items() if v.grad is not None}
    del star, at_theta
    grad_u = {k: torch.zeros_like(P[k]) for k in U}
    if not second:  # first order: g* at theta* is the gradient at theta
        add_into(grad_u, {k: gstar[k] for k in U if k in gstar})
        add_into(grad_u, direct)
        return _finish(prob, comm, grad_u, stats, chunks, stats_moves)

    full = [gstar.setdefault(k, torch.zeros_like(P[k])) for k in leaf_names]
    comm.all_reduce(full)
    first = {k: gstar[k].clone() for k in U}  # the first-order hypergradient: g* at theta*, plus the prior at theta
    direct_all = {k: direct[k].clone() if k in direct else torch.zeros_like(P[k]) for k in U}
    comm.all_reduce(list(direct_all.values()))
    add_into(first, direct_all)
    # 3. pull g* back through the merge; identity parts and dJ/dW0 go to rank 0's share
    dV = {}
    for k in kv:
        W0 = P[k].detach().requires_grad_(k in Uset)
        Vk = V[k].requires_grad_(True)
        with torch.enable_grad():
            out = plan.apply(W0, Vk)
            ins = [Vk] + ([W0] if k in Uset else [])
            got = torch.autograd.grad(out, ins, gstar[k])
        dV[k] = got[0]
        if k in Uset and comm.rank == 0:
            grad_u[k].add_(got[1]).add_((dV[k].T @ plan.C_all).to(P[k].dtype))
    if comm.rank == 0:
        for k in U:
            if k not in kvset:  # mean-merged (sum_n g*/N = g*) or outside S_l (theta*[k] = theta[k])
                grad_u[k].add_(gstar[k])
    add_into(grad_u, direct)

    def direction(i: int, k: str) -> Tensor:  # u_i = D_i^T v_i on key k
        if k in kvset:
            rows = plan.rows(i)
            v = (dV[k][rows].T @ plan.C_all[rows]).to(P[k].dtype)
        else:
            v = gstar[k] / n_units
        if lora:
            return lora_delta(v, sizes[i][k], cfg.lora_rank, replay(units[i].lora_states[k]))
        return v.mul_(-sizes[i][k])

    # 4. sum_i H_i u_i on U
    # eps: no parameter tensor moves by more than hvp_eps of its own norm (floored for near-zero tensors)
    ratios = torch.zeros(n_units, dtype=torch.float64)
    if scheme != "jvp":
        scale = norms(P[k] for k in G)
        size = torch.tensor([float(P[k].numel()) for k in G], dtype=torch.float64, device=scale.device)
        floor = 0.1 * (scale.pow(2).sum() / size.sum()).sqrt()  # 0.1 x the RMS weight, for near-zero tensors
        scale = torch.maximum(scale, floor * size.sqrt())
        for i in mine:
            ratios[i] = float((norms(direction(i, k) for k in G) / scale).max())
    comm.all_reduce([ratios])
    if scheme != "jvp":
        rel = cfg.hvp_eps or default_hvp_eps(scheme, compute_dtype_now(dev, P[G[0]].dtype))
        biggest = float(ratios.max())
        eps = rel / biggest if biggest > 0 else 0.0
    for i in mine:
        u = units[i]
        if scheme == "jvp":
            add_into(grad_u, _jvp_hvp(prob, u, {k: direction(i, k) for k in G}, U))
            continue
        if eps == 0.0:
            continue
        for sign in ((1.0, -1.0) if scheme == "central" else (1.0,)):
            with torch.no_grad():
                params = {k: P[k] + (sign * eps) * direction(i, k) for k in G}
                for k in U:
                    params[k] = params.get(k, P[k]).detach().requires_grad_(True)
            per = noise_loss(functional_unet(unet, params), prob.sched, u.latents, u.states, u.noise, u.t)
            g = grads_of(per.mean(), {k: params[k] for k in U})
            del params, per
            add_into(grad_u, g, sign / (2 * eps) if scheme == "central" else 1.0 / eps)
    if scheme == "forward" and eps != 0.0:
        add_into(grad_u, grad_at_theta, -1.0 / eps)
    return _finish(prob, comm, grad_u, stats, chunks, stats_moves, first)


def _jvp_hvp(prob, u: Unit, direction: dict[str, Tensor], U: list[str]) -> dict[str, Tensor]:
    """(H u)[U] by forward-over-reverse: the directional derivative of grad_U L along ``direction``.

    Under autocast the pass runs on a copy of the whole UNet in the autocast dtype (autocast itself does not
    reach through torch.func's forward mode): the result then has that dtype's relative precision."""
    from contextlib import nullcontext

    from torch.func import functional_call, grad, jvp

    P, unet = prob.params, prob.unet
    dev = P[U[0]].device
    base = {k: P[k].detach() for k in list(direction) + U}
    tangent = {k: direction[k] if k in direction else torch.zeros_like(base[k]) for k in base}
    # forward-mode group_norm views tangents: strided inputs (VAE latents, an expanded text batch) break it
    lat, states, noise = u.latents.contiguous(), u.states.contiguous(), u.noise
    fixed, ctx = {}, nullcontext()
    if torch.is_autocast_enabled(dev.type):
        cd = torch.get_autocast_dtype(dev.type)
        fixed = {k: v.detach().to(cd) for k, v in list(unet.named_parameters()) + list(unet.named_buffers())
                 if k not in base and v.is_floating_point()}
        base = {k: v.to(cd) for k, v in base.items()}
        tangent = {k: v.to(cd) for k, v in tangent.items()}
        lat, states, noise = lat.to(cd), states.to(cd), noise.to(cd)
        ctx = torch.autocast(dev.type, enabled=False)

    def grad_u(th):
        def loss(th_u):
            model = lambda *a, **kw: functional_call(unet, {**fixed, **th, **th_u}, a, kw)  # noqa: E731
            return noise_loss(model, prob.sched, lat, states, noise, u.t).mean()

        return grad(loss)({k: th[k] for k in U})

    with plain_attention(unet), ctx:  # fused attention has no forward-mode derivative
        return dict(jvp(grad_u, (base,), (tangent,))[1])


def _finish(prob, comm: Comm, grad_u: dict, stats: Tensor, chunks, moves: dict,
            first: dict | None = None) -> tuple[Tensor, dict]:
    comm.all_reduce(list(grad_u.values()))
    comm.all_reduce([stats])
    for k, g in grad_u.items():
        prob.params[k].grad = g.to(prob.params[k].dtype)
    extras = {"target": stats[2:].mean(), **moves}
    if first is not None:
        extras.update(hypergradient_agreement([first[k] for k in grad_u], list(grad_u.values())))
    n_prior = sum(len(c.weights) for c in chunks if c.prior)
    if n_prior:
        extras["prior"] = stats[1] / n_prior
    return stats[0].clone(), extras  # float64 scalars without a graph
