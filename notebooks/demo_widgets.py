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
# # Model immunization in one minute: a teaching demo
# A tiny text-to-image model (the project's embedded toy, trained on a world of objects and artists' styles it
# draws itself) and the whole story of the paper in one click:
# 1. Pick concepts the publisher wants gone. They are **erased** (UCE) from the model.
# 2. An attacker can **re-learn** an erased concept with a few LoRA steps on 20 images of it.
# 3. **Immunization** (MIMA, or a baseline) changes the released weights so that this re-learning fails, for all
#    chosen concepts at once.
#
# What the click shows:
# - **before / after grids**: the attacker's generations at the chosen attack step, on the erased model without
#   immunization (left half of each row) and with it (right half), the same seeds;
# - **the attack curve**: the share of generations the toy world's oracle recognises as the concept, against
#   the attack step;
# - **the accuracy table**: the same numbers.
#
# Timing: one click with the default values (one concept, 10 immunization steps, 40 attack steps) took 62.5
# CPU-seconds on one torch thread (`python scripts/time_demo.py`), about a minute on an idle core; each further
# concept adds a share of the immunization and two attacks.
# Objects re-learn on the toy; artists do not within 100 LoRA steps even without a defence, so pick objects to
# see the effect. The full protocol, explained step by step, is notebooks 01-06.

# %% tags=["parameters"]
interactive = True  # papermill sets False: the widgets are skipped and the demo runs once with these values
concepts = ["cat"]
method = "mima"
immunize_steps = 10
attack_steps = 40

# %%
import ipywidgets as widgets
from IPython.display import Markdown, display

from mima_lib.evaluation.plots import show
from mima_lib.experiment import demo
from mima_lib.toy import world as toyworld

choices = toyworld.TARGET_OBJECTS + toyworld.TARGET_ARTISTS


def report(result):
    """Everything one click shows."""
    print(f"ran in {result.seconds['total']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()
                                                                 if k != "total") + ")")
    show(demo.attack_curves(result))
    display(Markdown(demo.accuracy_table(result)))


# %%
if interactive:
    pick = widgets.SelectMultiple(options=choices, value=tuple(concepts), description="concepts", rows=8)
    how = widgets.Dropdown(options=["mima", "imma-joint", "imma-sequential"], value=method, description="method")
    n_imm = widgets.IntSlider(value=immunize_steps, min=5, max=80, step=5, description="immunize")
    n_att = widgets.IntSlider(value=attack_steps, min=20, max=200, step=20, description="attack")
    go = widgets.Button(description="Erase, immunize, attack", button_style="primary")
    step = widgets.IntSlider(value=0, min=0, max=attack_steps, step=20, description="attack step")
    out, pictures = widgets.Output(), widgets.Output()
    state = {}

    def draw(change=None):
        with pictures:
            pictures.clear_output(wait=True)
            if "result" in state:
                show(demo.before_after(state["result"], step.value))

    def run(_):
        with out:
            out.clear_output()
            state["result"] = demo.run_demo(list(pick.value), how.value, n_imm.value, n_att.value)
            step.max, step.value = n_att.value, n_att.value
            report(state["result"])
        draw()

    go.on_click(run)
    step.observe(draw, names="value")
    display(widgets.VBox([widgets.HBox([pick, widgets.VBox([how, n_imm, n_att, go])]), out, step, pictures]))
else:
    result = demo.run_demo(concepts, method, immunize_steps, attack_steps, progress=False)
    show(demo.before_after(result))
    report(result)

# %% [markdown]
# ## Try this
# - **Two concepts at once**: add "umbrella". MIMA protects both with one immunization; switch the method to
#   `imma-sequential` and compare: the concept immunized first tends to come back.
# - **A longer attack**: set the attack slider to 120. Does the immunized curve stay low, or only rise later?
# - **Fewer immunization steps**: 5 instead of 10. The gap between the two halves of each row shrinks.
