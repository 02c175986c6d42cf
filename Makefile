# The two commands a new machine needs: `make demo` and `make test`. Each creates .venv and
# installs everything first (CPU torch pinned exactly; see constraints.txt for the tested set).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The exact CPU wheel; a looser pin would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0 setuptools wheel
	# DeepSpeed ships as a source package that imports torch while building: build it against ours.
	$(BIN)/pip install --quiet --no-build-isolation -c constraints.txt deepspeed
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# DeepSpeed JIT-compiles its CPU shared-memory comm op on first use (~30 s): do it once here,
	# not inside the first training run.
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
	touch $(STAMP)

demo: install
	$(BIN)/midtrain demo

test: install
	$(BIN)/python -m pytest --durations=15  # the slowest tests, to keep the suite short

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check midtrain tests benchmarks
	$(BIN)/ruff format --check midtrain tests benchmarks

format: install
	$(BIN)/ruff check --fix midtrain tests benchmarks
	$(BIN)/ruff format midtrain tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
