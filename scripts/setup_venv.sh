#!/usr/bin/env bash
# Creates or refreshes .venv/ with everything revvit needs, by the routes verified in
# ENVIRONMENT.md. Idempotent: when .venv/ is current (same inputs, imports work) it exits in
# about a second. Used by `make demo` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY="${PYTHON:-python3}"
STAMP="$VENV/.revvit-setup"
HASH=$(cat scripts/setup_venv.sh requirements.txt setup.py | sha256sum | cut -c1-16)

check_stack() {
  "$VENV/bin/python" - <<'PY' >/dev/null 2>&1
import torch, torchvision, detectron2, pytorchvideo, fvcore, av, pycocotools, revvit_d2
torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
PY
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && check_stack; then
  echo "[setup] .venv is current"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import sys" >/dev/null 2>&1; then
  echo "[setup] creating $VENV"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

echo "[setup] installing base tools"
# setuptools<81: detectron2.model_zoo imports pkg_resources, removed in setuptools 81.
"${PIP[@]}" install --upgrade pip "setuptools<81" wheel

echo "[setup] installing torch and torchvision"
# Lower bounds only: pinning torch to the local CPU wheel pairs it with a torchvision whose C++
# ops do not load (ENVIRONMENT.md, "the torch/torchvision pairing trap").
"${PIP[@]}" install "torch>=2.6" "torchvision>=0.21"

if ! "$VENV/bin/python" -c "import detectron2" >/dev/null 2>&1; then
  echo "[setup] installing detectron2 (sal-detectron2 0.7.2 wheel)"
  # The only detectron2 on the registry is tagged cp310; its pure-Python part works on newer
  # Pythons (the compiled _C is optional). Users with network access may install upstream
  # detectron2 from git instead; then this step is skipped.
  WHEELS="$VENV/_wheels"
  mkdir -p "$WHEELS"
  "${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.10 \
    sal-detectron2==0.7.2 -d "$WHEELS"
  src=$(ls "$WHEELS"/sal_detectron2-0.7.2-*.whl | grep -v py3-none-any | head -n 1 || true)
  if [ -n "$src" ]; then cp "$src" "$WHEELS/sal_detectron2-0.7.2-py3-none-any.whl"; fi
  "${PIP[@]}" install --no-deps "$WHEELS/sal_detectron2-0.7.2-py3-none-any.whl"
fi

echo "[setup] installing runtime and test requirements"
"${PIP[@]}" install -r requirements.txt

echo "[setup] installing revvit (editable)"
"${PIP[@]}" install --no-deps --no-build-isolation -e .

check_stack || { echo "[setup] ERROR: the installed stack does not import (see above)" >&2; exit 1; }
echo "$HASH" > "$STAMP"
echo "[setup] done"
