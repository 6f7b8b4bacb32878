#!/usr/bin/env bash
# Create benchmarks/peers/.venv: lightly + torchvision + transformers for benchmarks/peers/lightly_train.py.
#
#     bash benchmarks/peers/make_venv.sh            # creates (or completes) benchmarks/peers/.venv
#     PYTHON=python3.11 bash benchmarks/peers/make_venv.sh
#
# A venv of its own: torchvision works with the package registry's default torch build (CUDA-enabled, it also runs
# on CPU), not with hf-ssl's CPU pin (torch==2.13.0+cpu: `torchvision::nms does not exist`). Versions are pinned, so
# that a later measurement compares against the same lightly; transformers and safetensors are hf-ssl's versions,
# so that the encoder lightly_train.py saves loads in hf-ssl's evaluation as it was written.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$HERE/.venv}"
PYTHON="${PYTHON:-python3}"

TORCH="torch==2.14.1"
TORCHVISION="torchvision==0.29.1"
LIGHTLY="lightly==1.6.0"
TRANSFORMERS="transformers==5.25.0"
SAFETENSORS="safetensors==0.8.0"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "$TORCH" "$TORCHVISION" "$LIGHTLY" "$TRANSFORMERS" "$SAFETENSORS"
"$VENV/bin/python" - <<'PY'
import lightly, torch, torchvision, transformers
from torchvision.ops import nms  # fails with a torch that torchvision was not built for
print(f"lightly {lightly.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}")
PY
echo "ready: $VENV/bin/python benchmarks/peers/lightly_train.py --help"
