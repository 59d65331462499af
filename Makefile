# The two commands a new user needs: `make run` and `make test`. Both create and update the
# virtualenv first, so a bare machine with python3 is enough.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.paysaga-installed
BROWSER_STAMP := $(VENV)/.browser-checked

.PHONY: run test test-fast test-slow lint bench check simulate clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The Temporal UI test drives headless Chromium (a Debian package); it skips only without it.
$(BROWSER_STAMP):
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq chromium) \
	      || echo "note: could not install chromium; tests/system/test_temporal_ui.py will skip"; \
	  else \
	    echo "note: chromium is missing (as root: apt-get install -y chromium);" \
	         "tests/system/test_temporal_ui.py will skip"; \
	  fi; }
	@touch $(BROWSER_STAMP)

run: $(STAMP)
	$(BIN)/paysaga run

test: $(STAMP) $(BROWSER_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) $(BROWSER_STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

# The saga's simulation (tests/system/test_simulation.py): SEEDS seeds of both profiles, from SEED_BASE
# on (`make test` runs a few fixed ones). A failure prints its seed and the command to rerun it.
SEEDS ?= 10
SEED_BASE ?= 1
simulate: $(STAMP)
	PAYSAGA_SIM_SEEDS=$(SEEDS) PAYSAGA_SIM_SEED_BASE=$(SEED_BASE) \
	  $(BIN)/python -m pytest tests/system/test_simulation.py -k "interleavings or faults" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/paysaga bench

check: $(STAMP)
	$(BIN)/paysaga check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
