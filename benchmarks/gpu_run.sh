#!/usr/bin/env bash
# One prepared device check for a lent GPU machine (torch preinstalled there, no network):
# installs the few wheels carried in .whl/, then runs the CUDA checks of the model and inference engine.
# Usage there: bash benchmarks/gpu_run.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:/tmp/site"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$out/env.txt"
for script in gpu_check.py gpu_predict.py; do
  if [ -f "benchmarks/$script" ]; then
    echo "== $script"
    timeout 240 python3 "benchmarks/$script" 2>&1 | tee "$out/${script%.py}.log"
  fi
done
