# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

DEMO_DATA      ?= data/demo
DEMO_IDS       ?= 1000
DEMO_IMAGES    ?= 20

.PHONY: setup demo test lint plots clean

setup: $(STAMP)

# torch is pinned in pyproject.toml; installing it in the same pip call keeps any other
# package from pulling a different (multi-GB) build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	# Partial FC's fused CPU kernels (g++ + ninja, ~1 min once; torch ops if this fails).
	-$(PY) -c "import sys; from partialfc.fast import cpu_kernels; sys.exit(cpu_kernels.main())"
	touch $(STAMP)

$(DEMO_DATA)/val.bin: | $(STAMP)
	$(VENV)/bin/facetrain synth --identities $(DEMO_IDS) --images-per-id $(DEMO_IMAGES) \
	    --val-identities 200 --val-pairs 3000 --out $(DEMO_DATA)

# The demo recipe trains in bf16 with channels-last tensors (train.precision / channels_last
# in configs/demo_cpu.yaml: ~2x fp32 on a CPU with AVX512-BF16 or AMX, BENCHMARKS.md).
# `make demo DEMO_SET="--set train.precision=fp32 --set train.channels_last=false"` on a CPU
# without bf16 units; add `--set train.compile=true` for a compiled step.
DEMO_SET ?=

demo: $(STAMP) $(DEMO_DATA)/val.bin
	$(VENV)/bin/facetrain train configs/demo_cpu.yaml $(DEMO_SET)

test: $(STAMP)
	$(VENV)/bin/pytest -q

# 2-D toy figure of every margin head (about a minute on 2 cores).
plots: $(STAMP)
	$(VENV)/bin/facetrain plots --out docs/figures

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf output data/demo
