# The two set-up commands of the README. Both create or refresh .venv/ first
# (scripts/setup_venv.sh is idempotent and takes about a second when .venv/ is current).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean-venv

setup:
	@bash scripts/setup_venv.sh

# The main jobs on built-in data (generated on first use into ./datasets): a small Rev-ViT
# Mask R-CNN trained and evaluated on synthetic COCO-format shapes, then a tiny Rev-MViT video
# model trained and tested (5 clips x 1 crop) on synthetic Kinetics-layout clips.
demo: setup
	$(PY) tools/train_net.py
	$(PY) tools/run_video.py

test: setup
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

# For everyday development (docs/development.md): the suite without the tests marked `slow`
# (tool runs, training runs, benchmarks end to end). `make test` stays the full check.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf .venv
