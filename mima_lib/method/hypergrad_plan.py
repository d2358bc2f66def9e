"""The plan of one streamed MIMA step (:mod:`mima_lib.method.hypergrad`): its random draws, replayed by every
pass (:class:`Unit` per simulated attack, :class:`Chunk` per group of upper-batch rows), the closed-form merge
split in two (:class:`MergePlan`: targets per unit, then the solve), the communicator of a concept-parallel
run (:class:`Comm`) and the finite-difference step size."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .bilevel import active_concepts, sample_rows
from .diffusion import draw_noise
from .merge import _apply_merge, _compute_dtype, _merge_system, unique_rows
from .paramsets import lora_A

__all__ = ["Comm", "LOCAL", "default_hvp_eps", "compute_dtype_now", "Unit", "Chunk", "MergePlan", "replay",
           "draws", "grads_of", "add_into", "norms"]


class Comm:
    """Single process. Subclasses (one rank of several) override ``rank``, ``world`` and :meth:`all_reduce`."""

    rank = 0
    world = 1

    def all_reduce(self, tensors: list[Tensor]) -> None:
        """Sum every tensor in place over all ranks (nothing to do in one process)."""

    def owns(self, index: int) -> bool:
        return index % self.world == self.rank


LOCAL = Comm()


def default_hvp_eps(scheme: str, dtype: torch.dtype) -> float:
    """Relative finite-difference step: eps is chosen so that no parameter tensor moves by more than this
    fraction of its norm. ~cbrt(machine eps) / 2 for central differences, ~sqrt(machine eps) for forward
    ones, of the autocast dtype when autocast is on (float32: 2.5e-3 / 3.5e-4, float64: 3e-6 / 1.5e-8,
    bfloat16: 0.1 / 0.09; measured optima on the toy UNet in float32: ~1e-3-3e-3 / ~3e-4-1e-3)."""
    tiny = torch.finfo(dtype).eps
    return float(0.5 * tiny ** (1 / 3) if scheme == "central" else tiny ** 0.5)


def compute_dtype_now(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


@dataclass
class Unit:
    """One simulated attack: its inner batch and draws, replayed by every pass of step 4."""

    latents: Tensor
    states: Tensor
    noise: Tensor
    t: Tensor
    lora_states: dict | None  # inner name -> generator state before its LoRA A draw


@dataclass
class Chunk:
    """Rows of the upper batch evaluated together: at theta* ('star') or at theta (the immunized prior)."""

    rows: slice
    weights: Tensor  # d J / d per-example loss
    concepts: list[tuple[int, slice]]  # (concept index, rows within the chunk)
    prior: bool
    at: str


class MergePlan:
    """merge_cross_attention split in two: targets V_n = C_n W'_n^T per unit, then the closed form from V.

    Same factors, same compute dtype and same row deduplication as mima_lib.method.merge.merge_cross_attention."""

    def __init__(self, prob, concepts: list[int], kv: list[str]):
        rows = [prob.token_rows[n] for n in concepts]
        self.sizes = [len(r) for r in rows]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(rows))]
        C_all = torch.cat(rows)
        self.keep = unique_rows(C_all)
        dtype = torch.float64 if prob.cfg.merge_float64 else None
        self.cd = _compute_dtype(dtype, C_all, prob.reg_rows, *[prob.params[k] for k in kv])
        self.C_all = C_all.to(self.cd)
        self.C = C_all[self.keep].to(self.cd)
        self.d, self.L_S = _merge_system(self.C, prob.reg_rows.to(self.cd), prob.cfg.merge_ridge, 0.0, None)

    def rows(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])

    def targets(self, i: int, W: Tensor) -> Tensor:
        return self.C_all[self.rows(i)] @ W.to(self.cd).T

    def apply(self, W0: Tensor, V_all: Tensor) -> Tensor:
        return _apply_merge(W0.to(self.cd), self.C, V_all[self.keep], self.d, self.L_S).to(W0.dtype)


def replay(state) -> torch.Generator:
    g = torch.Generator("cpu")
    g.set_state(state)
    return g


def draws(prob, step: int, gen: torch.Generator):
    """Every random number of one step, in the order autograd_step draws them."""
    cfg = prob.cfg
    bs = cfg.batch_size
    T = prob.sched.config.num_train_timesteps
    concepts = active_concepts(prob, step)
    x_u = [sample_rows(prob.latents[n], bs, gen) for n in concepts]

    def unit(lat, st):
        noise, t = draw_noise(lat, T, gen)
        lora = None
        if cfg.inner_params == "lora":  # inner_step draws one A per LoRA target after the loss's draws
            lora = {}
            for k in prob.inner_names:
                lora[k] = gen.get_state()
                p = prob.params[k]
                lora_A(torch.zeros(1, p.shape[1], dtype=p.dtype), cfg.lora_rank, gen)
        return Unit(lat, st, noise, t, lora)

    if cfg.method == "imma-joint":
        x_l = torch.cat([sample_rows(prob.latents[n], bs, gen) for n in concepts])
        s_l = torch.cat([prob.states[n:n + 1].expand(bs, -1, -1) for n in concepts])
        units = [unit(x_l, s_l)]
    else:
        units = [unit(sample_rows(prob.latents[n], bs, gen), prob.states[n:n + 1].expand(bs, -1, -1))
                 for n in concepts]
    # upper_loss: prior samples, then one draw for the concatenated batch (and one for a prior at theta)
    use_prior = cfg.prior_weight > 0 and bool(prob.prior_latents)
    p_lat, p_st = [], []
    if use_prior:
        for j, pl in enumerate(prob.prior_latents):
            p_lat.append(pl[torch.randint(0, len(pl), (bs,), generator=gen)])
            p_st.append(prob.prior_states[j:j + 1].expand(bs, -1, -1))
    together = use_prior and cfg.prior_on == "merged"
    sizes = [len(x) for x in x_u]
    lat = torch.cat(x_u + (p_lat if together else []))
    st = torch.cat([prob.states[n:n + 1].expand(len(x), -1, -1) for n, x in zip(concepts, x_u)]
                   + (p_st if together else []))
    noise, t = draw_noise(lat, T, gen)
    upper = [(lat, st, noise, t)]
    c_w = 1.0 / len(concepts) if cfg.concept_reduction == "mean" else 1.0
    weights = torch.cat([torch.full((s,), -c_w / s, dtype=torch.float64) for s in sizes])
    chunks, start = [], 0
    for g0 in range(0, len(concepts), cfg.concept_chunk):
        group = range(g0, min(g0 + cfg.concept_chunk, len(concepts)))
        stop = start + sum(sizes[j] for j in group)
        inside, o = [], 0
        for j in group:
            inside.append((j, slice(o, o + sizes[j])))
            o += sizes[j]
        chunks.append(Chunk(slice(start, stop), weights[start:stop], inside, False, "star"))
        start = stop
    if use_prior:
        n_p = sum(len(x) for x in p_lat)
        pw = torch.full((n_p,), cfg.prior_weight / n_p, dtype=torch.float64)
        if together:
            chunks.append(Chunk(slice(start, start + n_p), pw, [], True, "star"))
        else:
            p = torch.cat(p_lat)
            upper.append((p, torch.cat(p_st), *draw_noise(p, T, gen)))
            chunks.append(Chunk(slice(0, n_p), pw, [], True, "theta"))
    return concepts, units, upper, chunks


def grads_of(loss: Tensor, leaves: dict[str, Tensor]) -> dict[str, Tensor]:
    names = list(leaves)
    got = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    return {k: g for k, g in zip(names, got) if g is not None}


def add_into(acc: dict, grads: dict, scale: float = 1.0) -> None:
    for k, g in grads.items():
        if k in acc:
            acc[k].add_(g, alpha=scale)
        else:
            acc[k] = g.mul_(scale) if scale != 1.0 else g


def norms(tensors) -> Tensor:
    """Euclidean norm of every tensor, as one float64 vector (one device sync for all)."""
    return torch.stack([torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in tensors])
