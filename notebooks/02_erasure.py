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
# # 02 · Erasure (UCE)
# The re-learning task starts from a model that no longer produces the target concepts: UCE's closed-form edit
# maps each concept's tokens in every cross-attention key/value projection to a guide prompt, preserving the
# other concepts.

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
erased = stages.erase(cfg, run_dir, force=force)
erased.summary()

# %% [markdown]
# Rows: target concepts; left half before erasure, right half after (same seeds).

# %%
stages.show_erasure(erased)
