#!/usr/bin/env bash
# The whole test suite (README's second command). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pytest -q --durations=15 "$@"
