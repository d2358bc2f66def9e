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
# # 03 · Immunization: MIMA and the IMMA-inspired baselines
# MIMA (Algorithm 1): per concept one simulated adaptation step, Custom Diffusion's closed-form merge of the
# adapted models, then gradient ascent of the merged model's loss on the immunized parameters (exact
# hypergradient, `order: 2`). Baselines: IMMA applied concept after concept, and IMMA on the union of the data.

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
immunized = stages.immunize(cfg, run_dir, force=force)
immunized.summary()

# %%
stages.show_immunization(immunized)
