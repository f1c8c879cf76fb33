#!/usr/bin/env bash
# Create a fresh .venv with Python 3.12 or newer and install costtap from this checkout.
#
#   tools/venv.sh          the proxy and its command line
#   tools/venv.sh test     plus the test dependencies
#   tools/venv.sh dev      plus ruff and mypy
#
# Set COSTTAP_PYTHON to pick the interpreter; otherwise the first Python 3.12 or newer among
# python3.12, python3.13, python3 and pyenv's installed versions is used.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"

is_recent_python() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1
}

find_python() {
    local candidate
    for candidate in "${COSTTAP_PYTHON:-}" python3.12 python3.13 python3; do
        if [ -n "$candidate" ] && is_recent_python "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
        if [ -x "$candidate" ] && is_recent_python "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if ! python="$(find_python)"; then
    echo "tools/venv.sh: no Python 3.12 or newer found; install one or set COSTTAP_PYTHON" >&2
    exit 2
fi

echo "tools/venv.sh: creating .venv with $("$python" --version) ($python)" >&2
"$python" -m venv --clear .venv
if [ -n "$extras" ]; then
    .venv/bin/python -m pip install --quiet ".[$extras]"
else
    .venv/bin/python -m pip install --quiet .
fi
echo "tools/venv.sh: installed costtap into .venv" >&2
