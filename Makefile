# Two commands on a fresh machine: `make demo` runs the main job, `make test` the test suite.
# Both create the virtual environment first (PyTorch's local CPU build, then the project and
# its dev tools: pytest, ruff, mypy). `make test-fast` is the tier to run while editing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-reliability lint system bench bench-pretrain bench-attacks \
	bench-sequential

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The exact pin picks the local CPU wheel; anything looser pulls GBs of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# The main job end to end through the real HTTP API and a real worker on the embedded default
# (SQLite, a filesystem broker): pre-train an undefended and an at-pcl ConvNet on Fashion-MNIST
# (Debian's package, installed by `system` where it is missing), audit both on the same
# instances, print their ASR side by side with the verdicts. `make demo DEMO=--quick`: digits.
demo: $(STAMP) system
	BULWARK_DATA_DIR=$(CURDIR)/runs/demo-service $(BIN)/bulwark demo --out runs/demo $(DEMO)

system:
	scripts/ensure-system

# The tests run in TEST_PROCESSES pytest-xdist processes, one file per process at a time (a
# module's fixtures are built once): the waits of the service tests on their worker and
# server processes overlap the other process's CPU work. TEST_PROCESSES=0: one process.
TEST_PROCESSES ?= 2
PYTEST := $(BIN)/pytest -q -n $(TEST_PROCESSES) --dist loadfile

# Everything: lint, format, types, and every test (slow ones and real worker processes too).
test: lint system
	$(BIN)/mypy
	$(PYTEST)

# The inner loop: lint and the tests not marked slow or e2e (pyproject markers).
test-fast: lint system
	$(PYTEST) -m "not slow and not e2e"

# The reliability suite in full (tests/reliability, README): each fault 5 times against its own
# Postgres cluster and Redis. `make test` (so CI) runs each fault once.
test-reliability: $(STAMP)
	BULWARK_RELIABILITY_REPEATS=5 $(BIN)/pytest -q -m reliability tests/reliability

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# All the performance evidence in one run (docs/performance.md): pre-training vs ART, then
# FC/CP/BP crafting vs ART, matmul fractions, head re-training and instance scaling.
bench: bench-pretrain bench-attacks

bench-pretrain: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/bench_pretrain.py

bench-attacks: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/bench_attacks.py

# Sequential against full audits of the four defenses (issue 10's target): about 15 minutes
# on 2 cores, models and reports under runs/bench-sequential.
bench-sequential: $(STAMP) system
	$(BIN)/python bench/bench_sequential.py --out runs/bench-sequential
