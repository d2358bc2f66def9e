# The two commands of the README:
#   make demo   run the main job on the embedded default (CPU, minutes)
#   make test   run the test suite
# Both create .venv on first use. TORCH_SPEC picks the torch build: the default is the CPU wheel
# (an unpinned torch pulls a multi-GB CUDA build); on a GPU machine use e.g. TORCH_SPEC=torch EXTRAS=test,lpips
# (LPIPS needs torchvision, which does not import beside the CPU wheel).
PYTHON ?= python3.11
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-fast venv clean-runs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# the real CLIP BPE vocabulary for the Stable-Diffusion-shaped test model (mima_lib/testing): the wheel
	# only, without its dependencies (torchvision would not import beside the CPU torch)
	$(PY) -m pip install -q --no-deps "clip-anytorch==2.6.0"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(VENV)/.installed

# default.yaml runs 3 seeds: DEMO_WORKERS of them at once, each a process with one torch thread
DEMO_WORKERS ?= 3
demo: venv
	$(PY) -m mima_lib.experiment.run papermill_params/default.yaml --workers $(DEMO_WORKERS)

# Two pytest-xdist workers with one torch thread each, subprocesses and notebook kernels included
# (OMP_NUM_THREADS): the torch work of the tests is small ops that one thread runs as fast as two, and two
# processes with two threads each on 2 cores run ~7x slower. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
test: venv
	OMP_NUM_THREADS=1 MIMA_TEST_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test-fast: venv
	OMP_NUM_THREADS=1 MIMA_TEST_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow"

clean-runs:
	rm -rf runs
