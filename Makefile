# Two commands for a new user:
#   make demo   runs the main job on the bundled captures (convert -> pre-train -> fine-tune ->
#               evaluate -> predict) and prints where every artifact is
#   make test   runs the test suite
# Both create (or reuse) the virtual environment in .venv and install what they need first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-runtime
TEST_STAMP := $(VENV)/.installed-test
DEMO_DIR ?= demo-output

.PHONY: install install-test demo test clean-demo

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@

install-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(BIN)/pip install --quiet -r requirements-test.txt
	@touch $@

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh $(DEMO_DIR)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -ra

clean-demo:
	rm -rf $(DEMO_DIR)
