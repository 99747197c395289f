#!/usr/bin/env bash
# The one prepared GPU check: the fast-path equality tests on CUDA, then
# `benchmarks/speed.py --device cuda`; results land in benchmarks/results/speed/speed_cuda.*
# and, on the lent machine, in $OUT. See ../shared/device/README.md.
#
# Prepare on this machine (git-ignored folder .device/, carried with the checkout):
#   echo /.device/ >> .git/info/exclude
#   mkdir -p .device/data .device/lrurec
#   cp -r ../shared/device/wheels ../shared/device/ray-2.60.0-slim-cp312.tar.xz .device/
#   cp ../shared/data/*.txt .device/data/
#   cp /tmp/LRURec/model/lru.py .device/lrurec/     # the official model file, never committed
# Run there (device tool): bash benchmarks/device_speed.sh          (~6 min on an H100/H200)
# Dry run here (CPU, fewer repetitions): DEVICE=cpu QUICK=1 PYTHON=.venv/bin/python bash benchmarks/device_speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/device_speed_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .device/wheels ] && ! $PY -c "import ray, pydantic" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl
  tar -xJf .device/ray-2.60.0-slim-cp312.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
if [ -d .device/data ]; then export METAREC_SHARED_DATA=$PWD/.device/data; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true; } | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
# equality first (CUDA cases run only where CUDA is available), its log kept either way
status=0
$PY -m pytest -q -p no:cacheprovider tests/test_fastpath.py tests/test_models.py > "$OUT/tests.log" 2>&1 || status=1
tail -3 "$OUT/tests.log"
official=()
[ -f .device/lrurec/lru.py ] && official=(--official .device/lrurec)
if [ -n "${QUICK:-}" ]; then
  $PY benchmarks/speed.py --device "$DEVICE" --quick "${official[@]}" | tee "$OUT/speed_quick.jsonl"
else
  $PY benchmarks/speed.py --device "$DEVICE" "${official[@]}" 2>&1 | tee "$OUT/speed.log" | grep '^{' || true
  cp benchmarks/results/speed/speed_"$DEVICE"*.{json,md} "$OUT/" 2>/dev/null || cp benchmarks/results/speed/speed.{json,md} "$OUT/"
fi
exit $status
