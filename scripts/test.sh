#!/usr/bin/env bash
# The test command: sets up its own venv on a fresh machine, then runs the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
python -m pytest -q -p no:cacheprovider tests "$@"
