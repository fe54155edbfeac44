#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh
python3 -m pip install -q -e ".[test]"
python3 -m ruff check .
python3 tools/sz.py
python3 -m pytest -q "$@"
