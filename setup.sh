#!/usr/bin/env bash
# Create .venv and install piformer with everything its tests and the main job use.
# Usage: ./setup.sh            (idempotent; reuses .venv if present)
#        PIFORMER_EXTRAS=dev ./setup.sh   (skip the secure-inference and HF extras)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
EXTRAS=${PIFORMER_EXTRAS:-pi,hf,dev}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch: on these machines `torch==2.13.0` resolves to a local CPU wheel;
# an unpinned torch would pull several GB of CUDA packages.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
.venv/bin/python -c "import piformer, torch; print('piformer', piformer.__version__, '| torch', torch.__version__)"
