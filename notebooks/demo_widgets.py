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
# A tiny text-to-image model trained on a toy world of objects and artists' styles.
# 1. Pick concepts the publisher wants gone. They are **erased** (UCE) from the model.
# 2. An attacker can **re-learn** an erased concept with a few LoRA steps on 20 images.
# 3. **Immunization** (MIMA) changes the released weights so that this re-learning fails, for all concepts at once.
#
# Left half of each row: the attacker's model without immunization. Right half: with immunization.
# The percentages are how often the toy world's oracle recognises the concept.

# %% tags=["parameters"]
interactive = True  # papermill sets False: the widgets are skipped and the demo runs once with these values
concepts = ["van gogh", "cat"]
method = "mima"
immunize_steps = 20
attack_steps = 60

# %%
import ipywidgets as widgets
from IPython.display import Markdown, display

from mima_lib.experiment import demo
from mima_lib.toy import world as toyworld

choices = toyworld.TARGET_OBJECTS + toyworld.TARGET_ARTISTS

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

    def show(change=None):
        with pictures:
            pictures.clear_output(wait=True)
            if "result" in state:
                display(demo.side_by_side(state["result"], step.value))

    def run(_):
        with out:
            out.clear_output()
            state["result"] = demo.run_demo(list(pick.value), how.value, n_imm.value, n_att.value)
            step.max, step.value = n_att.value, n_att.value
        show()

    go.on_click(run)
    step.observe(show, names="value")
    display(widgets.VBox([widgets.HBox([pick, widgets.VBox([how, n_imm, n_att, go])]), out, step, pictures]))
else:
    result = demo.run_demo(concepts, method, immunize_steps, attack_steps, progress=False)
    display(demo.side_by_side(result, attack_steps))
    display(Markdown(demo.accuracy_table(result)))
