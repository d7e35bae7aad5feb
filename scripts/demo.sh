#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M-Instruct), from a fresh machine. Extra args are overrides.
# Ends with a short quality report (lola_eval.report): held-out perplexity teacher vs linearized by position,
# one passkey probe with and without LoLA's sparse cache, bytes per sequence, and where the full results are.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
python linearize.py recipe=smollm2 "$@"
OUT=runs/smollm2
for arg in "$@"; do
  case "$arg" in output_dir=*) OUT="${arg#output_dir=}" ;; esac
done
python -m lola_eval.report --linearized "$OUT/export/model" --out "$OUT/report"
