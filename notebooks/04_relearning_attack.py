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
# # 04 · Re-learning attack
# The attacker fine-tunes each model (no defense, IMMA baselines, MIMA) on the erased concept's 20 attacker
# images with its original prompt. Snapshots at fixed steps and seeds let the report compare image by image.

# %% tags=["parameters"]
params_file = "../papermill_params/default.yaml"  # the experiment: one YAML of papermill_params/
run_root = "../runs"  # run folders live here (ignored by git)
force = False  # True: recompute outputs that already exist

# %%
from mima_lib.experiment import stages
from mima_lib.experiment.config import run_dir_for
from mima_lib.experiment.loading import load_experiment

cfg = load_experiment(params_file)
run_dir = run_dir_for(cfg, run_root)

# %%
attacks = stages.attack(cfg, run_dir, force=force)
attacks.summary()

# %%
stages.show_attacks(attacks)
