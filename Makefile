# The two commands of the README: `make demo` runs the main job, `make test` runs the tests.
# Both create (or reuse) a virtual environment in .venv. PYTHON=python3.12 make ... picks another Python.
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= workdir/smoke
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m medim_jax.main --config configs/smoke.py --workdir $(WORKDIR) --mode all

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) workdir
