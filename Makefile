# make install: .venv with the plugin and its test/viz extras (quick when nothing changed)
# make test:    formatting check, then the whole test suite    make demo: prepare a corpus, train, evaluate (CPU, a few minutes)
# make gpu-check: on one CUDA GPU (install a CUDA torch into .venv first), in under 10 minutes: tests/test_cuda.py,
#                 then the benchmark's enwik8 rows (64 streams of 512, L = 16K) in fp32 and bf16 as one table

PYTHON ?= python3
VENV ?= .venv
# The local CPU wheel here; on a cluster, install your own CUDA torch into $(VENV) first and it is kept.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fairseq-expire-installed
SOURCES := setup.py README.md fairseq_expire_compat.py fairseq_expire_compat.pth \
	$(shell find fairseq_expire -name '*.py' 2>/dev/null)
export OMP_NUM_THREADS ?= 1

.PHONY: install test gpu-check demo format clean

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

gpu-check: install
	@$(PY) -c "import sys, torch; sys.exit(None if torch.cuda.is_available() else \
		'gpu-check: $(PY) sees no CUDA GPU (torch ' + torch.__version__ + '): install a CUDA torch into $(VENV)')"
	timeout 360 $(PY) -m pytest -q -rs tests/test_cuda.py
	timeout 240 $(PY) scripts/benchmark.py --config enwik8 --lengths 16384 --models expire_span_lm --modes train \
		--no-follow --dtypes fp32 bf16 --batches 5 --warmup 2 --json gpu-check.json

demo: install
	$(PY) scripts/demo.py

format: install
	$(PY) -m black $(FORMATTED)
	$(PY) -m isort $(FORMATTED)

clean:
	rm -rf $(VENV) build *.egg-info
