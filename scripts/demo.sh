#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M-Instruct), from a fresh machine. Extra args are overrides.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
python linearize.py recipe=smollm2 "$@"
