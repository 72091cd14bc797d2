"""Shared fixtures of the Python tests: the snapguard binary under test and its batch checker.

The binary is `$SNAPGUARD_BIN`, or `target/debug/snapguard` (tests/python/run.sh builds it).
"""

import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def snapguard_bin() -> str:
    path = os.environ.get("SNAPGUARD_BIN") or str(ROOT / "target" / "debug" / "snapguard")
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"no snapguard binary at {path}: run `cargo build` or set SNAPGUARD_BIN")
    return path


def check_batch(requests, config=None):
    """snapguard's verdict on each request, in order, from one `snapguard check --batch` process.

    Each request is a dict: method, target, and optionally headers ([[name, value], ...]) and body
    (str). Each verdict is the JSON object `check --batch` prints: decision, route, rule, field,
    status, body (and error for decision "invalid").
    """
    args = [snapguard_bin()]
    if config is not None:
        args += ["--config", str(config)]
    args += ["check", "--batch"]
    payload = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in requests)
    done = subprocess.run(args, input=payload.encode(), capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"snapguard check --batch exited {done.returncode}: {done.stderr.decode()}")
    verdicts = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert len(verdicts) == len(requests), (len(verdicts), len(requests))
    return verdicts


@pytest.fixture(scope="session")
def snapguard():
    return snapguard_bin()
