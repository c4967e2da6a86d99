#!/usr/bin/env bash
# One command for a GPU machine with no network: install tidal (a wheel built elsewhere by
# packaging/build_wheels.sh for this Python when one is given, else that script run here for sm_90
# with all cores), run the tests (GPU tests included), compute-sanitizer over the kernel tests, and
# the benchmarks with their peers, writing every log under $OUT (default bench/out). The last lines
# printed are the summary tables.
#
#   bash bench/device_run.sh                      # everything
#   TESTS="tests/ops -k cuda" BENCHES="bench/bench_attention.py" bash bench/device_run.sh
#   WHEEL=dist/tidal-*.whl SANITIZE=0 bash bench/device_run.sh
#
# Knobs (environment): WHEEL (install this wheel, falling back to a source build if it does not
# import), TESTS (pytest arguments; "none" skips), SANITIZE (1: compute-sanitizer memcheck, racecheck
# and initcheck over the kernel tests), BENCHES (scripts to run; "none" skips), SERVE_ARGS /
# TRAIN_ARGS / LOAD_ARGS (extra arguments of bench/serve.py / bench/train.py / bench/load.py).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" TIDAL_CUDA=ON TIDAL_CUDA_ARCHS="${TIDAL_CUDA_ARCHS:-90}" TIDAL_HIP=OFF
PY="${PYTHON:-python3}"
status=0
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
# Pass TIDAL_COMMIT from the machine that made the tree: a copy may carry another .git.
export TIDAL_COMMIT="${TIDAL_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"

# What the image lacks, carried as wheels under .whl/peers (bench/peer_wheels.sh downloads them on a
# machine with an index): the training peers (DeepSpeed and its pure-Python dependencies;
# BENCHMARKS.md), the server's and the load test's packages, auditwheel.
if compgen -G ".whl/peers/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-deps --no-index .whl/peers/*.whl >"$OUT/peers_install.log" 2>&1 ||
    echo "the peer wheels did not install (see peers_install.log)"
fi

install_ok=0
if [ -n "${WHEEL:-}" ]; then
  stamp "install $WHEEL"
  if "$PY" -m pip install --no-deps --no-index --force-reinstall $WHEEL >"$OUT/build.log" 2>&1 &&
     (cd /tmp && "$PY" -c "import tidal; assert tidal.build_info()['cuda']"); then
    install_ok=1
    # The wheel's native core with this tree's Python package: Python edits need no new wheel.
    site="$(cd /tmp && "$PY" -c 'import os, tidal; print(os.path.dirname(tidal.__file__))')"
    (cd python/tidal && find . -name '*.py' -exec cp --parents {} "$site/" \;)
  else
    echo "the wheel did not install or import; building from source"; tail -5 "$OUT/build.log"
  fi
fi
if [ "$install_ok" -eq 0 ]; then
  # The release script, for this machine's Python: the GPU tests run on what a user would install.
  stamp "build the wheel with packaging/build_wheels.sh (sm_${TIDAL_CUDA_ARCHS})"
  bash packaging/build_wheels.sh --python "$(command -v "$PY")" --no-isolation \
    --cuda-archs "$TIDAL_CUDA_ARCHS" --out "$OUT/dist" >"$OUT/build.log" 2>&1
  wheel="$(ls "$OUT"/dist/tidal-*.whl 2>/dev/null | head -1)"
  if [ -z "$wheel" ] && compgen -G "$OUT/dist/raw/tidal-*.whl" >/dev/null; then
    # no auditwheel on this machine (it is carried in .whl/peers): the wheel as built, unrepaired
    wheel="$(ls "$OUT"/dist/raw/tidal-*.whl | head -1)"
    echo "installing the unrepaired wheel $(basename "$wheel") (auditwheel unavailable)"
  fi
  if [ -z "$wheel" ] || ! "$PY" -m pip install --no-deps --no-index --force-reinstall "$wheel" >>"$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"
    exit 1
  fi
fi
(cd /tmp && "$PY" -c "import json, tidal; print(json.dumps(tidal.build_info()))") | tee "$OUT/build_info.json"

if [ "${TESTS:-all}" != "none" ]; then
  stamp "tests"
  # shellcheck disable=SC2086
  "$PY" -m pytest -q -p no:cacheprovider ${TESTS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [ "${SANITIZE:-1}" = "1" ] && command -v compute-sanitizer >/dev/null; then
  # memcheck: out-of-bounds and misaligned accesses; racecheck: shared-memory data races;
  # initcheck: reads of device memory never written. One log each; any error fails the status.
  # NOTE(tidal): torch's caching allocator is off under the sanitizer, so every tensor is its own
  # cudaMalloc: memcheck then sees an access past a tensor's end (inside a cached segment it cannot),
  # and initcheck sees a tensor's memory as unwritten until the tensor itself is written.
  for tool in memcheck racecheck initcheck; do
    stamp "compute-sanitizer $tool over the serving kernel tests (CUDA cases)"
    log="$OUT/sanitizer_$tool.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
      "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_sanitize_cases.py >"$log" 2>&1
    rc=$?
    tail -15 "$log"
    [ "$rc" -eq 0 ] || { echo "compute-sanitizer $tool: exit $rc (see $log)"; status=1; }
  done
fi

[ "${BENCHES:-}" = none ] && { stamp "done (status $status)"; exit "$status"; }
stamp "benchmarks"
for bench in ${BENCHES:-bench/bench_attention.py bench/bench_rotary.py bench/bench_fp8_quant.py bench/bench_skinny_linear.py bench/bench_moe.py bench/bench_checkpoint.py bench/serve.py bench/train.py bench/rlhf.py bench/disagg.py}; do
  name="$(basename "$bench" .py)"
  stamp "$name"
  if [ "$name" = "serve" ]; then
    # shellcheck disable=SC2086
    "$PY" "$bench" --out "$OUT" ${SERVE_ARGS:-} 2>&1 | tee "$OUT/$name.log" | tail -40
  elif [ "$name" = "rlhf" ] || [ "$name" = "disagg" ] || [ "$name" = "quant_quality" ]; then
    "$PY" "$bench" --out "$OUT" 2>&1 | tee "$OUT/$name.log" | tail -12
  elif [ "$name" = "load" ]; then
    # shellcheck disable=SC2086
    "$PY" "$bench" --out "$OUT" --device cuda ${LOAD_ARGS:-} 2>&1 | tee "$OUT/$name.log" | tail -12
  elif [ "$name" = "train" ]; then
    # shellcheck disable=SC2086
    "$PY" "$bench" --out "$OUT" ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/$name.log" | tail -30
  else
    "$PY" "$bench" --out "$OUT/$name.md" 2>&1 | tee "$OUT/$name.log" | tail -30
  fi
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
stamp "done (status $status)"
exit "$status"
