# Entry points (see README): `make demo` and `make test` work on a fresh machine; both
# create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := data/phantom

.PHONY: setup demo test lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# Phantom -> integrity check -> train fold 0 -> infer -> validate and score the CSV.
demo: $(STAMP)
	$(BIN)/python scripts/make_phantom.py --out $(DEMO) --train-patients 30 --test-patients 6 --overwrite
	$(BIN)/python scripts/verify_data.py $(DEMO) --quiet
	rm -rf runs/demo
	$(BIN)/python scripts/train.py --config configs/demo.yaml --fold 0
	$(BIN)/python scripts/infer.py --config configs/demo.yaml --ensemble
	$(BIN)/python scripts/check_submission.py "$$(ls -t submissions/demo_*.csv | head -n 1)" \
		--data $(DEMO) --labels $(DEMO)/test_labels

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done
