#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh
python3 -m pip install -q -e ".[test]"
# what the demo's browser tests drive (Debian's Chromium and its driver) and what `espresso draw`
# renders with (Graphviz), where apt can install them; elsewhere those tests skip, saying why
if ! command -v chromedriver >/dev/null || ! command -v dot >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        packages="chromium chromium-driver graphviz"
        apt-get install -y -q $packages >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 &&
            apt-get install -y -q $packages >/dev/null 2>&1; } || echo "could not install $packages" >&2
    fi
fi
python3 -m ruff check .
python3 tools/sz.py
python3 -m pytest -q "$@"
