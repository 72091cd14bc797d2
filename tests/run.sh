#!/usr/bin/env bash
# Every test of snapguard: the Python suites against the real things (Cinder's router and
# cinder-api, the Huawei SDK's EVS operations; tests/python/run.sh installs their pinned packages
# from PyPI into target/pyenv on first use), then the Rust suites. Arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/python/run.sh
# Last, so that its summary closes the run.
cargo test --locked "$@"
