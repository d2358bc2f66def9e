# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Immunization: MIMA's bi-level step, unrolled, then run
#
# **Why this step.** An erased model can be fine-tuned back (notebook 04 shows it). Immunization changes the
# released weights so that *this fine-tuning fails*. The trick of IMMA (Zheng & Yeh, ECCV 2024) is to play the
# attacker during training: simulate one step of the attacker's fine-tuning, look at how well the attacked model
# then does on the concept, and move the weights so that it does *worse*. MIMA (AAAI 2025) does this for N
# concepts at once. Immunizing against them one after another does not work well: each new concept's updates
# undo the earlier ones (the `imma-sequential` baseline shows it). MIMA simulates N attacks, one per concept,
# and **merges** the N attacked models into one, with the closed form Custom Diffusion uses to combine concepts.
# Then it makes that merged model bad at all N concepts at once.
#
# **The maths: Algorithm 1's two levels** (`mima_lib.method.bilevel`; the settings are
# `mima_lib.method.problem.ImmunizeConfig`). $\theta$ are the current weights (`Problem.params`); $S_l$ is what the
# simulated attacker adapts (`inner_params`), $S_u$ what immunization changes (`outer_params`); $L(x, c;\theta)$
# is the diffusion noise-prediction loss of latents $x$ under prompt $c$ (`concept_loss`).
#
# *Lower level*: one simulated attack per concept $n$ (`inner_step`), on a batch $x_l^{(n)}$ of its images:
#
# $$\theta'_n = \theta - \alpha_n \odot \nabla_{S_l} L\big(x_l^{(n)}, c_n; \theta\big)\qquad\text{(only } S_l
#   \text{ changes).}$$
#
# $\alpha$ = `inner_lr`. With `inner_scaling: adam` (the default) $\alpha_{n,k}$ is Adam's first step on tensor
# $k$: the tensor moves by `inner_lr` per element in RMS, the scale of the attacker's AdamW learning rate
# (`mima_lib.method.paramsets.inner_step_size`). The step size is held constant in the derivative.
#
# *The merge* (`merged_params`): $\theta^* = \mathrm{Merge}(\theta; \theta'_1, \dots, \theta'_N)$.
#
# *Upper level* (`upper_loss`): the objective the optimiser *minimises* on $S_u$, with learning rate
# $\beta$ = `outer_lr` (AdamW):
#
# $$J(\theta) = -\frac1N \sum_n L\big(x_u^{(n)}, c_n; \theta^*\big) \;+\; w\, L\big(x_{reg}, c_{reg}; \theta\big),$$
#
# i.e. gradient **ascent** of the merged attacked model's loss on the targets, plus a prior term with weight
# $w$ = `prior_weight` on regularization images (`data.regularization_concepts`, and with `prior_unconditional`
# the empty prompt), which keeps the model's other abilities. The paper sums the concept losses; we average them
# (`concept_reduction`), which only rescales $\beta$.
#
# **Custom Diffusion's merge** (`mima_lib.method.merge`). Applied to every cross-attention key / value
# projection; other adapted tensors are averaged (`merge_mean`). For one projection with current weight $W_0$
# (`W0`), stack the target-token rows of all concepts in $C$ (`C`, $r\times d_{in}$, rows after BOS, duplicates
# removed by `unique_rows`), the outputs each attacked layer gives on its own concept's rows in $V$
# (`V`: rows $C_n W_n'^\top$), and the rows of about 200 regularization captions in $C_{reg}$ (`C_reg`,
# `Problem.reg_rows`). Solve
#
# $$\min_W \lVert (W - W_0)\, C_{reg}^\top \rVert_F^2 \quad\text{subject to}\quad W C^\top = V^\top,$$
#
# "change the layer as little as possible on ordinary captions, but give every concept's tokens exactly what its
# own attacked layer gave them". With $M = C_{reg}^\top C_{reg}$ (plus a small ridge, `merge_ridge`) and
# $d = C M^{-1}$:
#
# $$W = W_0 + \big(V^\top - W_0 C^\top\big)\,\big(d\, C^\top\big)^{-1} d .$$
#
# Only solves and Cholesky factors (`merge_projection`), so $W$ is differentiable in $W_0$ and in every $W'_n$.
#
# **The hypergradient** (`order: 2`, the paper's "differentiable model merging"). Write $g^* = \partial J /
# \partial \theta^*$, the gradient of the upper loss at the merged weights. The chain rule through the merge and
# through each inner step gives
#
# $$\nabla_\theta J \;=\; \underbrace{w\,\nabla_\theta L_{reg}}_{\text{prior, direct}}
#   \;+\; \Big(\frac{\partial\theta^*}{\partial\theta}\Big|_{W_0}\Big)^{\!\top} g^*
#   \;+\; \sum_n \big(I - \alpha_n H_n\big)\,\Big(\frac{\partial\theta^*}{\partial\theta'_n}\Big)^{\!\top} g^*,
#   \qquad H_n = \nabla^2_\theta L\big(x_l^{(n)}, c_n;\theta\big).$$
#
# The term $-\alpha_n H_n u_n$ is a **Hessian-vector product**: how the attacker's step itself changes when the
# weights change. Autograd computes it by a double backward (`autograd_step`, `hypergrad: autograd`), or concept
# by concept, by finite differences or forward-mode products of gradients (`mima_lib.method.hypergrad.streamed_step`,
# `hypergrad: hvp`, memory flat in N). `order: 1` drops the second-order part: $g^*$ itself is applied to
# $\theta$, as if the merged weights were constants (the reference code's choice).
# Fused attention has no double backward, so the exact path runs the plain attention processor
# (`plain_attention`).
#
# **What this project does differently, and why** (toy defaults, `ImmunizeConfig.toy`): $S_l$ = all of
# cross-attention and $S_u$ = its K/V only (ascending all of attn2 damaged an untargeted artist five times as much),
# the prior on the immunized weights with weight 3 (with the reference's 1.0 on $\theta^*$ the untargeted
# concepts lost as much as the targets), 45 outer steps instead of 500 at AdamW lr $10^{-2}$, and
# `outer_rows: targets` (`mima_lib.method.selective`): each K/V update is projected onto the text-state rows the
# targets own, $W \leftarrow W_0 + (W - W_0)P$, so the empty prompt (classifier-free guidance's unconditional
# branch) and the shared "a photo of a" prefix are read exactly as before, and other prompts nearly so. In
# personalization the rows of each instance's class ("a photo of a cat" for "a photo of <new1> cat") are taken
# out of $P$ too (`protect_prompts`): the instance is protected, and its class stays drawable. On the toy,
# personalization also narrows $P$ to the directions at least as strong in the instances' rows as in every other
# base concept's (`row_contrast: 1`, `contrast_prompts`): the instances' own rows begin with `< new 1 >`, tokens the
# toy text encoder never saw, and without this their span took flower, tree, cup and van gogh with it.
#
# "Nearly so" has a size. An untargeted prompt's rows $c$ change by $(W - W_0)Pc$: their overlap with the targets'
# span times how far the targets' keys and values moved. On the toy's 128-d text states the overlap is about what
# random directions have (a few percent to a tenth), and 45 steps move the targets' K/V outputs to about 8 times
# their norm, so an untargeted object can move by half of its own norm and be lost. `kv_budget` caps the targets'
# change (`target_kv_change` in `immunize.json` logs it per step): with a cap of 2-3 no untargeted concept lost
# anything, but the attacker re-learned the targets sooner (README, issue #14's bar 4).
#
# **What to look at.** Below, one iteration by hand: the inner steps' size, the merge's constraint residual
# (zero to rounding for the merged weights, not for a plain average), the upper loss, and the exact
# hypergradient against finite differences. Then the losses over the full run: the attacked model's loss on the
# targets should rise, the prior loss should stay low.

# %% tags=["parameters"]
params_file = "../papermill_params/default.yaml"  # the experiment: one YAML of papermill_params/
run_root = "../runs"  # run folders live here (ignored by git)
force = False  # True: recompute outputs that already exist

# %%
from dataclasses import replace

import torch

from mima_lib.evaluation.plots import plot_bars, plot_lines, show
from mima_lib.experiment import stages
from mima_lib.experiment.config import immunize_config, merge_captions, run_dir_for
from mima_lib.experiment.loading import load_run

cfg = load_run(params_file)  # a `seeds:` file opened by hand: its first seed
run_dir = run_dir_for(cfg, run_root)
print(f"experiment {cfg.experiment!r} ({cfg.task}): immunize against {cfg.concepts} with {cfg.immunize.methods}")

# %% [markdown]
# ## One MIMA iteration, unrolled
# The problem as the stage prepares it (`mima_lib.method.problem.prepare`): the erased model, the defender's
# images of each concept keyed by its prompt, the prior's images, the merge's captions. In float64 here, so that
# the finite differences at the end agree to many digits; `step_sizes = {}` records the attacker's step sizes on
# first use and replays them, since the hypergradient treats them as constants.

# %%
from diffusers.models.attention_processor import AttnProcessor

from mima_lib.experiment.stages.common import starting_pipeline
from mima_lib.experiment.stages.data import load_data
from mima_lib.method import bilevel, merge
from mima_lib.method.problem import prepare

data = load_data(cfg, run_dir)
pipe = starting_pipeline(cfg, run_dir)  # the erased model (the base model for personalization)
pipe.unet.to(torch.float64).requires_grad_(False)
pipe.unet.set_attn_processor(AttnProcessor())  # plain attention: fused attention has no double backward
icfg = replace(immunize_config(cfg, "mima"), method="mima", order=2, hypergrad="autograd", diagnose_every=0)
concept_images = {cfg.concept(c).attack_prompt: data.images[c]["immunize"] for c in cfg.concepts}
reg = {p: ims for p, ims in data.regularization.items() if ims}
prob = prepare(pipe, concept_images, reg or None, None, icfg, merge_captions(cfg))
prob.step_sizes = {}
for key in prob.outer_names:
    prob.params[key].requires_grad_(True)
print(f"S_l ({icfg.inner_params}): {len(prob.inner_names)} tensors; S_u ({icfg.outer_params}): "
      f"{len(prob.outer_names)} tensors; inner_lr {icfg.inner_lr:g} ({icfg.inner_scaling}), prior_weight "
      f"{icfg.prior_weight:g} on {prob.reg_prompts}")

# %% [markdown]
# **Lower level.** The upper batches $x_u^{(n)}$ are drawn first, then one simulated attack per concept, in the
# order `autograd_step` draws them (so that the library's step reproduces ours exactly, checked below).
# `create_graph=True` keeps the graph of each inner gradient: the second-order term needs it.

# %%
gen = torch.Generator().manual_seed(0)
theta = bilevel.live_params(prob)  # S_u are the parameters themselves; other S_l tensors detached leaves
concepts, bs = list(range(len(prob.prompts))), icfg.batch_size
x_u = [bilevel.sample_rows(prob.latents[n], bs, gen) for n in concepts]
adapted = []
for n in concepts:
    x_l = bilevel.sample_rows(prob.latents[n], bs, gen)
    c_n = prob.states[n:n + 1].expand(bs, -1, -1)
    adapted.append(bilevel.inner_step(prob, theta, x_l, c_n, gen, create_graph=True, unit=n))
    print(f"theta'_{n} for {prob.prompts[n]!r}: ||theta' - theta|| / ||theta|| on S_l = "
          f"{bilevel.relative_move(theta, adapted[-1], prob.inner_names):.2e}")

# %% [markdown]
# **The merge**, and its constraint residual on one K/V layer: $\lVert W C^\top - V^\top\rVert / \lVert V\rVert$
# (do the concepts' tokens get what their attacked layers gave them?) and the change on the regularization
# captions $\lVert (W - W_0) C_{reg}^\top\rVert / \lVert W_0 C_{reg}^\top\rVert$, for three candidates: the
# unattacked $W_0$, the plain mean of the attacked layers, and the merge. `merge_projection` on this layer alone
# gives the same weight as `merged_params` does for all layers.

# %%
theta_star = bilevel.merged_params(prob, theta, adapted, concepts)
k = next(name for name in prob.inner_names if merge.is_cross_attention_kv(name))
rows = torch.cat([prob.token_rows[n] for n in concepts])
keep = merge.unique_rows(rows)
C = rows[keep]
V = torch.cat([prob.token_rows[n] @ adapted[n][k].T for n in concepts])[keep]
with torch.no_grad():
    W0 = theta[k]
    candidates = {"W0 (no merge)": W0, "mean of attacked": torch.stack([a[k] for a in adapted]).mean(0),
                  "merged W": theta_star[k]}
    residual = {}
    for name, W in candidates.items():
        residual[name] = {"||W C^T - V^T|| / ||V||": float((W @ C.T - V.T).norm() / V.norm()),
                          "||(W - W0) C_reg^T|| / ||W0 C_reg^T||":
                              float(((W - W0) @ prob.reg_rows.T).norm() / (W0 @ prob.reg_rows.T).norm())}
        print(f"{name:>18s}: " + ",  ".join(f"{m} = {v:.2e}" for m, v in residual[name].items()))
    W_layer = merge.merge_projection(W0, C, V, prob.reg_rows, ridge=icfg.merge_ridge, dtype=torch.float64)
print(f"layer {k}: {len(C)} constraint rows, {len(prob.reg_rows)} caption rows; merge_projection vs "
      f"merged_params: max |difference| {float((W_layer - theta_star[k].detach()).abs().max()):.1e}")
show(plot_bars({m: {name: v[m] for name, v in residual.items()} for m in next(iter(residual.values()))},
               "relative norm", title="the merge on one K/V layer (printed above)"))

# %% [markdown]
# **The upper loss** $J$ at $\theta^*$ (the concept terms) and at $\theta$ (the prior, `prior_on: immunized`).

# %%
losses, prior = bilevel.upper_loss(prob, theta_star, theta, x_u, concepts, gen)
target = losses.mean() if icfg.concept_reduction == "mean" else losses.sum()
J = -target + (icfg.prior_weight * prior if prior is not None else 0)
for n in concepts:
    print(f"L(x_u, {prob.prompts[n]!r}; theta*) = {float(losses[n].detach()):.5f}")
print(f"prior L(x_reg; theta) = {float(prior.detach()) if prior is not None else float('nan'):.5f};  "
      f"J = {float(J.detach()):.5f}")

# %% [markdown]
# **The hypergradient.** The exact one, by backward through everything above, and the first-order one: $g^*$
# (the gradient at $\theta^*$, merged weights held fixed) plus the prior's direct gradient.
# `hypergradient_agreement` gives their cosine and the share of the exact gradient the second-order part makes.
# Then the check: on a small slice (a random unit direction $v$ in one K/V tensor of $S_u$) the directional
# derivative $\langle\nabla J, v\rangle$ against central finite differences
# $\big(J(\theta + \varepsilon v) - J(\theta - \varepsilon v)\big) / 2\varepsilon$ of the library's own
# `autograd_step` with the same draws.

# %%
U = prob.outer_names
exact = torch.autograd.grad(J, [theta[name] for name in U], retain_graph=True)
first = torch.autograd.grad(J, [theta_star[name] for name in U], retain_graph=True)
if prior is not None and icfg.prior_on == "immunized":  # the prior at theta: first order by definition
    direct = torch.autograd.grad(icfg.prior_weight * prior, [theta[name] for name in U], allow_unused=True)
    first = [f if d is None else f + d for f, d in zip(first, direct)]
agree = bilevel.hypergradient_agreement(first, exact)
print(f"cos(first order, exact) = {agree['hypergrad_cos']:.6f}; second-order share = {agree['second_order_share']:.2%}")

j = 0  # the slice: tensor U[0]
v = torch.randn(prob.params[U[j]].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
v /= v.norm()


def J_at(shift: float) -> float:
    """The library's one-step objective with U[j] moved by shift * v, from the same draws (seed 0)."""
    with torch.no_grad():
        prob.params[U[j]].add_(shift * v)
    try:
        return float(bilevel.autograd_step(prob, 0, torch.Generator().manual_seed(0))[0].detach())
    finally:
        with torch.no_grad():
            prob.params[U[j]].sub_(shift * v)


assert abs(J_at(0.0) - float(J.detach())) < 1e-10, "autograd_step should reproduce the unrolled step"
eps = 1e-4
fd = (J_at(eps) - J_at(-eps)) / (2 * eps)
slopes = {"exact": float((exact[j] * v).sum()), "first order": float((first[j] * v).sum()), "central diff.": fd}
for name, val in slopes.items():
    print(f"{name:>14s}: {val:+.9e}   (relative to finite differences: {abs(val - fd) / abs(fd):.1e})")
errors = {name: abs(val - fd) / abs(fd) for name, val in slopes.items() if name != "central diff."}
show(plot_bars({"|<grad J, v> - central diff.| / |central diff.|": errors}, "relative difference", log=True,
               title="hypergradient vs finite differences on one K/V tensor"))

# %% [markdown]
# The exact hypergradient matches the finite differences to rounding (the test suite asks for 1e-5 relative);
# the first-order one does not. Over the whole gradient the second-order part is a small share here, because the
# Adam-scaled inner step is small (it moves $S_l$ by about 0.2%); along one direction of one tensor the
# first-order error can be much larger than that share (tens of percent in some smoke runs), since the
# second-order part need not point where the first-order part does. The share grows with `inner_lr`; on the
# SD-shaped test model it is about 5% (README).
#
# ## The full run
# `mima_lib.experiment.stages.immunize` runs every method of `immunize.methods` from the erased model with
# `mima_lib.method.immunize.immunize` (the steps above, `steps` times, AdamW on $S_u$) and writes only the changed
# $S_u$ tensors to `runs/<experiment>/immunized/<method>/`, with the per-step losses. Baselines:
# `imma-sequential` (IMMA on concept 1 for `steps` steps, then concept 2, ...) and `imma-joint` (one simulated
# attack on the union of all concepts' images, no merge). Progress: a line per tenth of the steps with an ETA.

# %%
immunized = stages.immunize(cfg, run_dir, force=force)
immunized.summary()

# %% [markdown]
# ### Losses over the steps
# Left: the attacked (merged, for MIMA) model's mean loss on the targets, what the ascent raises. Middle: the
# prior loss, what must stay low. Right: how far each step's simulated attack moved $S_l$ (relative), the
# attacker's strength as the defender sees it.

# %%
panels = {"targets: attacked-model loss (raised)": {}, "prior loss (kept low)": {},
          "inner move ||theta'-theta||/||theta||": {}}
for m, info in immunized.runs.items():
    for panel, key in zip(panels, ("target", "prior", "inner_move")):
        pts = {s + 1: e[key] for s, e in enumerate(info["extras"]) if key in e}
        if pts:
            panels[panel][m] = pts
show(plot_lines({p: lines for p, lines in panels.items() if lines}, "immunization step", "per-step value"))
for m, info in immunized.runs.items():
    d = info.get("diagnostics", {})
    print(f"{m:>16s}: " + ", ".join(f"{key} {val:.3g}" for key, val in d.items()))

# %% [markdown]
# Read the curves with notebook 04 in mind: a rising target loss says that *one simulated step* of the attacker
# does worse; whether the real attacker's 60 steps do worse is what 04 measures. `hypergrad_cos` and
# `second_order_share` (means over the steps where they were logged) repeat the one-step check above for the
# whole run.
#
# ## Try this
# - **First order**: `--set immunize.settings.order=1`. The run is faster (no double backward); the one-step
#   check above then shows how much gradient is dropped (the second-order share), and 06's MSGR tells whether it
#   mattered.
# - **A stronger simulated attacker**: `--set immunize.settings.inner_lr=1e-3` (ten times the toy default). The
#   inner move grows about tenfold, the second-order share grows, and the merge residual of the plain mean grows
#   while the merged one stays at rounding.
# - **No prior**: `--set immunize.settings.prior_weight=0`. The target loss rises faster, but 06's utility table
#   shows the untargeted concepts collapsing: the ascent finds generic damage first.
#
# Give each try its own name (`--set experiment=NAME`): a run folder made with other settings is refused.
