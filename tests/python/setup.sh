#!/usr/bin/env bash
# Creates (or reuses) the virtual environment the Python tests run in: real Cinder, the Huawei
# Cloud SDK and pytest, every package pinned in requirements.txt. Prints the venv's python path.
# Needs Python >= 3.11 (Cinder 29's floor) and PyPI.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${SNAPGUARD_PYENV:-$here/../../target/pyenv}"
python="${PYTHON:-python3}"

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup.sh: Python >= 3.11 is needed for Cinder 29 (found $("$python" --version))" >&2
  exit 1
}
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -rf "$venv"
  "$python" -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    -r "$here/requirements.txt" >&2
  "$venv/bin/pip" check >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
