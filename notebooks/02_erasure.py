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
# # 02 · Erasure: remove the concepts with UCE's closed form
#
# **Why this step.** MIMA's re-learning task asks: a publisher has *erased* concepts from its model (an artist
# who opted out, an object class), and releases it. Can an attacker fine-tune the concepts back? Erasure alone
# does not stop this (notebook 04 shows the attacker succeeding in a few dozen steps); immunization (03) is what
# should. So the sequence first needs a model with the concepts erased.
#
# **What the paper does.** It erases with UCE (Unified Concept Editing, Gandikota et al. 2024): a closed-form
# edit of every cross-attention key and value projection (`attn2.to_k`, `attn2.to_v` in a diffusers UNet). These
# projections are the only place where the text enters the image model: the UNet reads the prompt's token states
# $c$ through $k = W_k c$ and $v = W_v c$. If the projections map the concept's tokens to what they map an
# innocuous *guide* prompt to (the empty prompt "" in the reference code), the model can no longer be steered to
# the concept, while every other prompt, explicitly *preserved*, keeps its keys and values.
#
# **The maths** (`mima_lib.method.erase.uce_edit`). For one projection with weight $W_0$ (`W0`, $d_{out}\times
# d_{in}$), erase rows $c_i$ (`erase_embeddings`), their guide rows $g_i$ (`guide_embeddings`, row $i$ pairs with
# erase row $i$) and preserve rows $c_j$ (`preserve_embeddings`), UCE solves
#
# $$\min_W \; \sum_i \lVert W c_i - W_0 g_i\rVert^2 \;+\; s \sum_j \lVert W c_j - W_0 c_j\rVert^2 \;+\;
#   \lambda \lVert W - W_0\rVert_F^2$$
#
# with $s$ = `preserve_scale` and $\lambda$ = `lam`. Setting the gradient to zero gives a linear system, and its
# solution is
#
# $$W = \Big[\sum_i (W_0 g_i)\,c_i^\top + s\sum_j (W_0 c_j)\,c_j^\top + \lambda W_0\Big]
#       \Big[\sum_i c_i c_i^\top + s\sum_j c_j c_j^\top + \lambda I\Big]^{-1}.$$
#
# The code never forms the inverse: it solves $B W^\top = A^\top$ (`torch.linalg.solve_ex`) with $A$ and $B$ the
# two brackets. $\lambda$ is a ridge: it keeps $W$ near $W_0$ in every direction no prompt constrains.
#
# **What this project does differently, and why.**
# - On Stable Diffusion the stage erases as the reference code does: the *bare* concept text ("van gogh", not
#   "an artwork of van gogh"), its tokens, EOS and the padding, toward the aligned rows of "", preserving "" and
#   the other concepts at $s = \max(0.1, 1/n)$ (`mima_lib.method.erase.reference_rows`).
# - The toy model: the first toy model needed a recipe of its own (the templated prompt with its padding,
#   `token_positions: all`, and a ridge of 8), because its text encoder gave a bare name other states than the
#   same name inside a prompt. Today's toy text encoder is pretrained so that they nearly match
#   (`mima_lib/toy/text.py`), and the toy erases as the reference code does, plus one set of rows: each
#   target's prompt as the world writes it ("a photo of a cat"), paired with "" as the bare name is
#   (`erase.templated`, on by default on the toy). With the bare names alone, the template words' rows, which
#   lie largely inside the names' span, moved far and took other objects with them, or, with the templates
#   preserved, cat kept 31% of its images. A kind with no target (artists only, say) keeps its template
#   instead (`erase.keep_templates`, on by default on the toy): nothing else pins "a photo of a", and erasing
#   van gogh and monet alone took 11 of the 12 objects with it. The settings this run uses are printed below
#   (`mima_lib.experiment.config.erase_settings_used`).
# - On the toy, *every other concept of the world* is preserved, and the oracle measures the erased concepts
#   and the untargeted `utility_concepts` before and after.
#
# **What to look at.** In the small example: the erased tokens' outputs move onto the guide's (distance near 0
# after the edit) while a preserved prompt's outputs barely move. In the grids: after erasure the target rows
# no longer show the concept (blank canvases or generic shapes), at the same seeds as before.

# %% tags=["parameters"]
params_file = "../papermill_params/default.yaml"  # the experiment: one YAML of papermill_params/
run_root = "../runs"  # run folders live here (ignored by git)
force = False  # True: recompute outputs that already exist

# %%
import torch

from mima_lib.evaluation.plots import labelled_grid, plot_bars, show
from mima_lib.experiment import stages
from mima_lib.experiment.config import erase_lam, erase_settings_used, run_dir_for
from mima_lib.experiment.loading import load_run

cfg = load_run(params_file)  # a `seeds:` file opened by hand: its first seed
run_dir = run_dir_for(cfg, run_root)
print(f"experiment {cfg.experiment!r} ({cfg.task}): erase {cfg.concepts}; run folder {run_dir}")

# %% [markdown]
# ## The step in the open: one UCE edit of one layer
# The stage's own arguments (`mima_lib.experiment.stages.erasure.uce_arguments`) say what is erased, toward what,
# and what is kept. Here we take the first target prompt, its guide and the preserved prompts, encode them with
# the model's text encoder (`mima_lib.method.text_tokens.encode_prompt_tokens`: the rows the UNet's
# cross-attention reads), and edit **one** value projection with `uce_edit`. The rows: every token after BOS up
# to EOS, each paired with the guide's row at the same place (`mima_lib.method.erase.align_guide_rows`; the
# stage also edits the padding rows, see `erase_concepts`' `token_positions`).

# %%
from mima_lib.experiment.stages.common import base_pipeline
from mima_lib.experiment.stages.erasure import uce_arguments
from mima_lib.method.erase import align_guide_rows, uce_edit
from mima_lib.method.text_tokens import encode_prompt_tokens

pipe = base_pipeline(cfg)
uce = uce_arguments(cfg)
print("erasure settings:", erase_settings_used(cfg))
prompt, guide, keep = uce["erase_prompts"][0], uce["guide_prompts"][0], [p for p in uce["preserve_prompts"] if p]
layer = next(n for n, _ in pipe.unet.named_modules() if n.endswith("attn2.to_v"))
W0 = pipe.unet.get_submodule(layer).weight.detach()
with torch.no_grad():
    c = encode_prompt_tokens(pipe, prompt)[0][1:]  # erase rows c_i: after BOS, to EOS
    g = align_guide_rows(c, encode_prompt_tokens(pipe, guide)[0][1:])  # guide rows g_i
    # preserve rows c_j (none when the parameter file preserves nothing, as the SD v1-4 files do)
    cp = torch.cat([t[1:] for t in encode_prompt_tokens(pipe, keep)]) if keep else c.new_zeros(0, c.shape[1])
s = uce["preserve_scale"] if uce.get("preserve_scale") is not None else max(0.1, 1 / max(1, len(keep)))
W = uce_edit(W0, c, g, cp, lam=erase_lam(cfg), preserve_scale=s)
print(f"layer {layer}: W0 is {tuple(W0.shape)}; erase {prompt!r} toward {guide!r}; {len(keep)} preserved "
      f"prompts ({len(cp)} rows), lam {erase_lam(cfg)}, s {s:.3g}")

# %% [markdown]
# The erased token's output before and after: distance of each erase row's value to its guide value,
# $\lVert W c_i - W_0 g_i\rVert / \lVert W_0 g_i\rVert$, with $W = W_0$ (before) and the edited $W$ (after);
# and how far the preserved rows moved, $\lVert W c_j - W_0 c_j\rVert / \lVert W_0 c_j\rVert$.

# %%
tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(prompt).input_ids)[1:len(c) + 1]
dist = {f"{i}:{t.replace('</w>', '')}": {
    "before (W0)": float((W0 @ c[i] - W0 @ g[i]).norm() / (W0 @ g[i]).norm()),
    "after (W)": float((W @ c[i] - W0 @ g[i]).norm() / (W0 @ g[i]).norm())} for i, t in enumerate(tokens)}
if len(cp):
    kept = ((cp @ W.T - cp @ W0.T).norm(dim=1) / (cp @ W0.T).norm(dim=1))
    print(f"preserved rows moved by {kept.mean():.1%} on average (max {kept.max():.1%})")
else:
    print("no preserved prompts: lam alone keeps W near W0")
show(plot_bars(dist, "distance to the guide's output", title=f"{prompt!r} -> {guide!r}: one value projection",
               percent=True))

# %% [markdown]
# Read the bars token by token: each erase row's distance to its guide value should fall from "before" to
# "after". It does not reach 0: the ridge $\lambda$ holds $W$ near $W_0$, and rows that preserved prompts share
# pull the other way. With a templated erase prompt ("a photo of a cat"), a causal text encoder gives the prefix
# "a photo of a" the same states as in every preserved prompt that starts alike, so that row gets two conflicting
# targets ($W c = W_0 g$ once, $W c = W_0 c$ once per preserved prompt, weighted by $s$), and least squares keeps
# it near $W_0 c$. The rows only the target has (its name, EOS) are free to go to the guide. That is why the
# reference code erases the bare name, and why the choice of rows is a setting (`token_positions`).
#
# ## The full stage
# `mima_lib.experiment.stages.erase` applies the same closed form to every `attn2.to_k` / `attn2.to_v` with all
# targets at once (`mima_lib.method.erase.erase_concepts`), writes only the changed weights to
# `runs/<experiment>/erased/erased.safetensors`, and generates every target before and after at the same seeds.

# %%
erased = stages.erase(cfg, run_dir, force=force)
erased.summary()

# %% [markdown]
# ### Generations before and after erasure
# Rows: target concepts (prompted as in training). Columns: seeds, first with the base model, then with the
# erased one; the same seed gives the same starting noise, so each "after" image is the "before" one's twin.

# %%
if erased.before is not None:
    n = len(erased.before) // len(cfg.concepts)
    cells = torch.cat([torch.cat([erased.before[i * n:(i + 1) * n], erased.after[i * n:(i + 1) * n]])
                       for i in range(len(cfg.concepts))])
    columns = [f"before s{k}" for k in range(n)] + [f"after s{k}" for k in range(n)]
    show(labelled_grid(cells, list(cfg.concepts), columns))

# %% [markdown]
# ### What the oracle sees
# The share of generations the toy oracle recognises as the concept: the targets should drop to near 0, the
# untargeted `utility_concepts` should stay where they were (any drop is what erasure costs).

# %%
acc = {**erased.info.get("oracle_accuracy", {}),
       **{f"{c} (kept)": v for c, v in erased.info.get("utility_accuracy", {}).items()}}
if acc:
    show(plot_bars(acc, "oracle accuracy", title="before vs after erasure", percent=True))

# %% [markdown]
# ## Try this
# - **Another ridge**: `--set erase.lam=8` (or 0.1). A larger $\lambda$ holds $W$ nearer $W_0$: expect the kept
#   concepts' bars to stay higher and the erased rows to stop further from the guide (in the one-layer example
#   the "after" bars rise); a smaller one the reverse.
# - **Other rows**: `--set erase.token_positions=all` erases the templated prompts with their padding (the first
#   toy model's recipe). Compare the one-layer bars: the prefix rows appear and barely move.
# - **Preserve nothing**: `--set erase.preserve_scale=0`. The one-layer example shows the preserved rows moving
#   much more; in the grids and bars the untargeted concepts degrade.
#
# Give each try its own name (`--set experiment=NAME`): a run folder made with other settings is refused.
