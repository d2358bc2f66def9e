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
# # 05 · The personalization attack: can the model learn a protected *new* concept?
#
# **Why this step.** The second threat of the paper: not a concept that was erased, but one the model never knew
# and should not learn, such as a private person's face or a particular object. The attacker has a handful of
# photos and teaches the model a modifier token: "a photo of <new1> cat" for *this* purple cat. Immunization
# (notebook 03, run on the base model: nothing is erased here, so notebook 02 is skipped) should make this
# personalization fail for the protected instances.
#
# **What the paper does.** 13 CustomConcept101 concepts (pets, furniture, scenes), the four attacks of notebook 04
# reported at step 40, with the modifier tokens of Custom Diffusion and Textual Inversion. Textual Inversion learns
# only the new token's embedding $e^*$, with the whole model frozen:
#
# $$e^* = rg\min_e \; \mathbb{E}_{x,\epsilon,t}\, ig\lVert \epsilon - \epsilon_	heta(x_t, t, c(e))ig
# Vert^2,$$
#
# Custom Diffusion learns the token and the cross-attention K/V, and LoRA / DreamBooth learn weights under the
# prompt with the modifier as plain text. To the immunizer the modifier is plain text too (four CLIP tokens), as
# in the reference code; the attacks then learn it as one new token
# (`mima_lib.attacks.data.MODIFIER_TOKEN`).
#
# **What this project does differently, and why.** The toy world has four personal instances ("purple cat",
# "spotted dog", "racing car", "heart cup", `papermill_params/toy_personalization.yaml`): variants of concepts
# the base model knows, which it has never seen. Their images are always renders: a model cannot generate what it
# never learned.
#
# **What to look at.** As in 04: the "no defense" curve should rise (the base model learns the instance), the
# immunized models' curves should stay lower. The toy oracle knows the instances; for other concepts the curves are
# skipped and the grids are the evidence.

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
# - **Textual Inversion**: `--set attack.methods=[textual_inversion]`. It changes no weight the immunizer
#   touched, only a new token's embedding; expect the protection to transfer least here.
# - **A protected vs an unprotected instance**: immunize against two of the four (`--set concepts=[purple
#   cat,spotted dog]`) and add the others as `evaluate.benign_concepts`. The report's harmless fine-tuning rows
#   should show that the immunized model still learns them.
# - **Fewer attacker photos**: `--set data.attack_images=5`. Personalization from five photos is harder; the
#   no-defense curve rises more slowly, and the gap to MIMA shrinks or grows.
#
# Give each try its own name (`--set experiment=NAME`): a run folder made with other settings is refused.
