#!/usr/bin/env bash
# Create the virtual environment with Python 3.12 and install the pinned requirements.
# Usage: scripts/make_env.sh VENV_DIR PYTHON_VERSION
set -euo pipefail
venv=${1:-.venv}
want=${2:-3.12.1}
find_python() {
  local cand
  for cand in "${PYTHON:-}" "$HOME/.pyenv/versions/$want/bin/python3.12" \
              "$(command -v pyenv >/dev/null 2>&1 && PYENV_VERSION=$want pyenv which python3.12 2>/dev/null)" \
              "$(command -v python3.12 || true)"; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then echo "$cand"; return 0; fi
  done
  return 1
}
if [ ! -x "$venv/bin/python" ]; then
  py=$(find_python) || {
    echo "error: Python 3.12 not found (set PYTHON=/path/to/python3.12, or 'pyenv install $want')" >&2
    exit 1
  }
  echo "creating $venv with $py"
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
echo "installing pinned requirements into $venv (torch is large on first install)"
"$venv/bin/python" -m pip install -q -r requirements.txt -c constraints.txt
"$venv/bin/python" -m pip install -q --no-deps -e .
