# Two entry points: `make demo` runs the main job on the embedded default; `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/pangudraw run examples/prompts.parquet

# Two workers, each taking whole test files (a file's module fixtures, such as its Ray session, stay in one process);
# then the simulated multi-node cluster in a fresh process: the workers keep gigabytes of compiled MindSpore graphs
# from earlier files, and beside them Ray's memory monitor killed the cluster's workers.
test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests --ignore=tests/test_multinode.py
	$(BIN)/python -m pytest -q tests/test_multinode.py

clean:
	rm -rf $(VENV) outputs
