# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · The re-learning attack: can the erased concepts be fine-tuned back?
#
# **Why this step.** This is the test immunization was trained for. The attacker downloads the released model
# (erased, then immunized or not) and fine-tunes it on its own images of an erased concept (notebook 01's
# `attack` images, which the defender never saw), under the concept's own prompt. If the concept comes back,
# the erasure protected nothing; if it does not, or only much later, immunization worked.
#
# **What the paper does.** On SD v1-4 the attacks are LoRA (reported at its 400th step, batch 4), DreamBooth,
# Textual Inversion and Custom Diffusion (reported at step 40), each run on the model without immunization
# ("no defense"), on MIMA's model and on the IMMA-inspired baselines' models. It compares image by image, at
# fixed steps and seeds, through CLIP / DINO / LPIPS similarity to the concept's references (notebook 06).
#
# **The attack in formulas** (`mima_lib.attacks.run_attack`, here LoRA: `mima_lib.attacks.lora`). LoRA adds a
# low-rank update to each attention projection, $W = W_0 + B A$ with $A \in \mathbb{R}^{r\times d_{in}}$,
# $B \in \mathbb{R}^{d_{out}\times r}$, $B$ starting at zero, and trains only $A, B$ with AdamW on
#
# $$\min_{A,B}\; \mathbb{E}_{x, \epsilon, t}\,\big\lVert \epsilon - \epsilon_\theta(\sqrt{\bar a_t}\,x +
#   \sqrt{1 - \bar a_t}\,\epsilon,\; t,\; c)\big\rVert^2 ,$$
#
# the same noise-prediction loss $L$ as in notebook 03 (`mima_lib.method.diffusion.noise_loss`). Immunization
# made one step of this descent useless for the merged concepts; the real attacker takes many.
#
# **What this project does differently, and why.** The toy attacks are shorter (`attack.settings.lora.steps`,
# 60 in the default file; LoRA's toy defaults in `mima_lib.attacks`), because the toy model re-learns in tens of
# steps, and they sample snapshots with the data's DDIM settings. The toy oracle gives a number per snapshot:
# the share of generations it recognises as the concept.
#
# **What to look at.** In the accuracy curves: the "no defense" line should climb toward 100% (erasure alone
# does not hold); an immunized model's line should stay low, or climb later. In the grids: rows are models,
# columns attack steps, and every cell uses the same prompt and seed, so differences are the models'.

# %% tags=["parameters"]
params_file = "../papermill_params/default.yaml"  # the experiment: one YAML of papermill_params/
run_root = "../runs"  # run folders live here (ignored by git)
force = False  # True: recompute outputs that already exist

# %%
from mima_lib.evaluation.plots import show
from mima_lib.experiment import stages
from mima_lib.experiment.config import run_dir_for
from mima_lib.experiment.loading import load_run

cfg = load_run(params_file)  # a `seeds:` file opened by hand: its first seed
run_dir = run_dir_for(cfg, run_root)
print(f"experiment {cfg.experiment!r} ({cfg.task}): attacks {cfg.attack.methods} on {cfg.concepts}, "
      f"seeds {cfg.attack.seeds}")

# %% [markdown]
# ## The runs
# `mima_lib.experiment.stages.attack` fine-tunes every model (no defense, then each method of `immunize.methods`)
# on every concept with every attack and seed, and keeps the snapshots (`runs/<experiment>/attacks/`). A line per
# finished run, with an ETA; finished runs are skipped on a rerun.

# %%
attacks = stages.attack(cfg, run_dir, force=force)
attacks.summary()

# %% [markdown]
# ## Attack curves
# The oracle's accuracy on each snapshot (rows of `n_images` generations at fixed seeds): one panel per concept,
# one line per model, for the first attack and seed. `mima_lib.toy.oracle.load_toy_oracle().accuracy(images,
# concept)` is the share of images whose top-1 label within the concept's kind is the concept.

# %%
curves = stages.show_attack_curves(attacks)
if curves is not None:
    show(curves)

# %% [markdown]
# The attacker's own training loss per step (from each run's `losses.json`): a defence need not raise it. The
# immunized model may fit the images as well and still not draw the concept, which is why the report judges
# images, not losses.

# %%
show(stages.show_attack_losses(attacks, run_dir))

# %% [markdown]
# ## Snapshot grids
# One grid per concept. Rows: models; columns: attack steps; the same prompt and seed in every cell.

# %%
for c in cfg.concepts:
    print(c)
    show(stages.show_attacks(attacks, concept=c))

# %% [markdown]
# ## Try this
# - **A longer attack**: `--set attack.settings.lora.steps=120 --set attack.snapshot_steps=[0,40,80,120]`. Does
#   MIMA's curve stay low, or only delay the attacker? `mima_lib.evaluation.metrics.steps_to_relearn` turns each
#   curve into the first step that reaches 60%.
# - **Another attacker**: `--set attack.methods=[dreambooth]` (or `textual_inversion`, `custom_diffusion`).
#   Immunization simulated a fine-tune of cross-attention; DreamBooth tunes the whole UNet, so the protection may
#   transfer less.
# - **More seeds**: `--set seeds=[0,1,2,3,4]` runs the whole sequence once more per seed (new data draws and
#   immunization too); `--set attack.seeds=[0,1,2]` only re-runs this attacker with other seeds. With 4 images
#   per cell one image is 25 points, so one seed's differences of that size are noise.
#
# Give each try its own name (`--set experiment=NAME`): a run folder made with other settings is refused.
