#!/usr/bin/env bash
# palign's GPU acceptance in one command, on a bare GPU machine: installs the bundle's wheels, then
# runs experiments/gpu/acceptance.py (the whole pipeline on a tiny random model with trainer=gpu, the
# training check at the Qwen2.5-7B shape, the inference check) and prints one table; exits non-zero
# when a step failed. About 5-8 minutes on one H100.
#
#   bash experiments/gpu/fetch_wheels.sh          # first, here: writes .gpu_bundle/ (wheels, tokenizer)
#   bash experiments/gpu/acceptance.sh            # on the GPU machine, from the repository root, .gpu_bundle carried
#   bash experiments/gpu/acceptance.sh --shrink   # anywhere: the same steps tiny, on the CPU
#
# Options: --bundle DIR (default .gpu_bundle), --no-install (use this Python's own packages, as the
# test suite does), --site DIR (where the wheels go, default /tmp/palign-gpu-site); the rest goes to
# acceptance.py (--shrink, --tokenizer DIR (default <bundle>/tokenizer), --out DIR, --deadline-s S,
# --steps ...). Python: $PYTHON, else python3.
set -euo pipefail
cd "$(dirname "$0")/../.."

BUNDLE=.gpu_bundle
SITE=/tmp/palign-gpu-site
INSTALL=auto
PYTHON=${PYTHON:-python3}
ARGS=()
TOKENIZER=
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE=$2; shift 2 ;;
    --site) SITE=$2; shift 2 ;;
    --no-install) INSTALL=no; shift ;;
    --tokenizer) TOKENIZER=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

if [ "$INSTALL" = auto ]; then
  if compgen -G "$BUNDLE/wheels/*.whl" >/dev/null; then
    echo "[acceptance] installing $(ls "$BUNDLE"/wheels/*.whl | wc -l) wheels from $BUNDLE/wheels into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$BUNDLE"/wheels/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "[acceptance] no wheels in $BUNDLE/wheels: using $PYTHON's own packages (run experiments/gpu/fetch_wheels.sh for a bare machine)"
  fi
fi

exec "$PYTHON" experiments/gpu/acceptance.py --tokenizer "${TOKENIZER:-$BUNDLE/tokenizer}" ${ARGS[@]+"${ARGS[@]}"}
