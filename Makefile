# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo_out
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

# Both run on the CPU: without this the tpu extra's libtpu looks for a TPU first (and says so).
demo test: export JAX_PLATFORMS := cpu

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,tpu]'
	touch $(STAMP)

# Synthetic catalogue -> TFDS dataset + tokenizer -> pretrain on CPU -> evaluate vs random init.
demo: install
	$(PY) -m scale_jax.data.synthetic --out $(DEMO)/raw --num-products 3000 --seed 0
	$(PY) -m scale_jax.data.build --raw $(DEMO)/raw --out $(DEMO)/data
	$(PY) -m scale_jax.train --config configs/demo.py --workdir $(DEMO)/run \
	    --config.data.dir=$(DEMO)/data
	$(PY) -m scale_jax.evaluate --workdir $(DEMO)/run --random-init

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO) .pytest_cache
