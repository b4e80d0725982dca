#!/usr/bin/env bash
# The default test suite (README's second command): everything but the tests marked slow, each of which
# a cheaper default test covers. Extra arguments go to pytest; a later -m replaces this one
# (`bash ci/test.sh -m slow` runs the slow rest, `bash ci/test.sh -m ""` everything).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pytest -q -m "not slow" --durations=15 "$@"
