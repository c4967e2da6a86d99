#!/usr/bin/env bash
# One command for a GPU machine with no network: build and install tidal for sm_90 with all cores,
# run the whole test suite (GPU tests included) and the benchmarks, and write every log under $OUT
# (default bench/out). Usage: bash bench/device_run.sh [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" TIDAL_CUDA=ON TIDAL_CUDA_ARCHS="${TIDAL_CUDA_ARCHS:-90}" TIDAL_HIP=OFF
PY="${PYTHON:-python3}"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"

echo "==> build (sm_${TIDAL_CUDA_ARCHS})"
if ! "$PY" -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
fi
"$PY" -c "import json, tidal; print(json.dumps(tidal.build_info()))" | tee "$OUT/build_info.json"

echo "==> tests"
"$PY" -m pytest -q -p no:cacheprovider tests "$@" 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "==> benchmarks"
# The GPU benchmarks; CPU workloads (bench_c1_cpu.py) run on the CPU machine.
for bench in ${BENCHES:-bench/bench_rms_norm.py}; do
  name="$(basename "$bench" .py)"
  "$PY" "$bench" --out "$OUT/$name.md" 2>&1 | tee "$OUT/$name.log" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit "$status"
