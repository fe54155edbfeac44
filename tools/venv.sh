# Sourced by the set-up commands (tools/test.sh, tools/run.sh): use the active virtualenv, else
# the project's own .venv, made on first use (a system python3 on Debian or Ubuntu refuses pip
# installs outside one), saying so in one line.
if ! python3 -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
    if [ ! -x .venv/bin/python3 ]; then
        echo "Setting up the project's virtualenv in .venv (not in one already)" >&2
        python3 -m venv .venv
    else
        echo "Using the project's virtualenv .venv" >&2
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
