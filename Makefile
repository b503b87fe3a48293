# The two set-up commands of the README. Both create or refresh .venv/ first
# (scripts/setup_venv.sh is idempotent and takes about a second when .venv/ is current).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test clean-venv

setup:
	@bash scripts/setup_venv.sh

# The main job on built-in data (generated on first use into ./datasets).
demo: setup
	$(PY) tools/eval_imagenet.py

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf .venv
