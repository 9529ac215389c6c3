# Entry points (see README): `make demo` and `make test` work on a fresh machine; both
# create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Extras of pyproject.toml installed into .venv: dev (tests, lint); dev,track adds the
# experiment trackers (`make setup EXTRAS=dev,track`; CI does after the README's commands,
# so their tests run there; without them those tests skip, saying why).
EXTRAS ?= dev
STAMP  := $(VENV)/.installed-$(EXTRAS)
DEMO   := data/phantom

.PHONY: setup demo smoke doctor test lint bench report-check base-config

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

# Phantom -> integrity check -> train fold 0 -> infer -> validate and score the CSV.
# RECIPE names the config (configs/$(RECIPE).yaml, whose experiment and infer.name are
# $(RECIPE) too): `make demo RECIPE=demo_patch` is the patch-training twin. SEED sets
# train.seed (the recipe's own when unset): benchmarks/demo_seeds.py runs several.
RECIPE ?= demo
SEED ?=
LATEST = "$$(ls -t submissions/$(RECIPE)_2*.csv | head -n 1)"
demo: $(STAMP)
	$(BIN)/python scripts/make_phantom.py --out $(DEMO) --train-patients 30 --test-patients 6 --overwrite
	$(BIN)/python scripts/verify_data.py $(DEMO) --quiet
	rm -rf runs/$(RECIPE)
	$(BIN)/python scripts/train.py --config configs/$(RECIPE).yaml --fold 0 $(if $(SEED),train.seed=$(SEED))
	$(BIN)/python scripts/infer.py --config configs/$(RECIPE).yaml --ensemble
	$(BIN)/python scripts/check_submission.py $(LATEST) --data $(DEMO) --labels $(DEMO)/test_labels
	$(BIN)/python scripts/report.py --ensemble --config configs/$(RECIPE).yaml \
		--csv $(LATEST) --labels $(DEMO)/test_labels

# A one-minute end-to-end run in the repository's own folders (CI runs it before the
# tests, which must not be affected by what it leaves in runs/, cache/, data/, submissions/).
SMOKE := data/smoke
SMOKE_SET := data.root=$(SMOKE) data.image_size=64 data.num_workers=0 train.epochs=1 \
	train.experiment=smoke infer.name=smoke "infer.ensemble=[{experiment: smoke, folds: [0]}]"
smoke: $(STAMP)
	$(BIN)/python scripts/make_phantom.py --out $(SMOKE) --train-patients 5 --test-patients 2 \
		--size 256 --overwrite
	$(BIN)/python scripts/verify_data.py $(SMOKE) --quiet
	rm -rf runs/smoke
	$(BIN)/python scripts/train.py --config configs/demo.yaml --fold 0 --quiet $(SMOKE_SET)
	$(BIN)/python scripts/infer.py --config configs/demo.yaml --ensemble --quiet $(SMOKE_SET) \
		--out submissions/smoke.csv
	$(BIN)/python scripts/check_submission.py submissions/smoke.csv --data $(SMOKE) \
		--labels $(SMOKE)/test_labels

# The machine self-check on the demo recipe (the default recipe: scripts/doctor.py alone).
doctor: $(STAMP)
	$(BIN)/python scripts/doctor.py --config configs/demo.yaml --quick

# The suite in parallel (pytest-xdist): one worker per core, each test file kept in one
# worker so its module fixtures (a trained tiny model) are built once. TEST_WORKERS=0 runs
# it in one process.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# configs/base.yaml and configs/schema.json from bonecomp/config.py (their only source).
base-config: $(STAMP)
	$(BIN)/python scripts/write_base_config.py

# The HTML report opened in headless Chromium (the system browser; Debian/Ubuntu:
# `apt-get update && apt-get install -y chromium`). Fails rather than skips without it.
report-check: $(STAMP)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
		echo "report-check needs Chromium: apt-get update && apt-get install -y chromium"; exit 1; }
	$(BIN)/python -m pytest tests/test_report.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done
