#!/usr/bin/env bash
# The Python tests: snapguard against real Cinder (its router, and cinder-api itself) and against
# the Huawei Cloud SDK's EVS operation table. Creates the pinned virtual environment, builds the
# debug binary, runs pytest. Extra arguments go to pytest (e.g. -k router).
set -euo pipefail
cd "$(dirname "$0")/../.."
python="$(bash tests/python/setup.sh)"
if [ -z "${SNAPGUARD_BIN:-}" ]; then
  cargo build --locked --quiet
  export SNAPGUARD_BIN="$PWD/target/debug/snapguard"
fi
exec "$python" -m pytest -q -p no:cacheprovider tests/python "$@"
