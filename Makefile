# make install: .venv with the plugin and its test/viz extras (quick when nothing changed)
# make test:    formatting check, then the whole test suite    make demo: prepare a corpus, train, evaluate (CPU, a few minutes)

PYTHON ?= python3
VENV ?= .venv
# The local CPU wheel here; on a cluster, install your own CUDA torch into $(VENV) first and it is kept.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fairseq-expire-installed
SOURCES := setup.py README.md fairseq_expire_compat.py fairseq_expire_compat.pth \
	$(shell find fairseq_expire -name '*.py' 2>/dev/null)
export OMP_NUM_THREADS ?= 1

.PHONY: install test demo format clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	@# fairseq 0.12.2 builds in pip's isolated environment, where torch is absent: its torch C++ extensions are
	@# skipped (their sources are missing from the sdist), its Cython ones are built. The torch above is kept.
	$(PY) -m pip install -q ".[test,viz]"
	$(PY) -c "import fairseq, fairseq_expire_compat" && touch $@

FORMATTED := fairseq_expire fairseq_expire_compat.py scripts tests setup.py

test: install
	$(PY) -m black --check -q $(FORMATTED) || { echo "not formatted: run make format"; exit 1; }
	$(PY) -m isort --check-only -q $(FORMATTED) || { echo "imports not sorted: run make format"; exit 1; }
	$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; rc=1; fi; exit $$rc

demo: install
	$(PY) scripts/demo.py

format: install
	$(PY) -m black $(FORMATTED)
	$(PY) -m isort $(FORMATTED)

clean:
	rm -rf $(VENV) build *.egg-info
