# Two commands on a fresh machine: `make demo` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup demo test test-fast bench-quality clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

$(DEMO_DATA)/coco/val/annotations.json: $(VENV)/.installed
	rm -rf $(DEMO_DATA)/coco
	$(PY) -m pipeline.cli synth $(DEMO_DATA)/coco --images 1200 --seed 0 --masks

$(DEMO_DATA)/prepared/split.json: $(DEMO_DATA)/coco/val/annotations.json
	$(PY) -m pipeline.cli prepare --annotations $(DEMO_DATA)/coco/train/annotations.json \
	  --images $(DEMO_DATA)/coco/train/images --percent 5 --seed 0 --out $(DEMO_DATA)/prepared \
	  --val-annotations $(DEMO_DATA)/coco/val/annotations.json --val-images $(DEMO_DATA)/coco/val/images

demo: $(DEMO_DATA)/prepared/split.json
	$(PY) -m pipeline.cli train --config configs/demo.yaml

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests

test-fast: setup  # the unit tests: no Ray, no MLflow server, no end-to-end training
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(DEMO_DATA) runs mlflow.db mlruns
