#!/usr/bin/env bash
# Downloads, on a machine with a package index, the wheels a GPU machine without network lacks, into
# .whl/peers (git-ignored, carried to the device run, installed there by bench/device_run.sh with
# --no-deps): the server's packages and their pure-Python dependencies (tests/server, bench/disagg.py,
# bench/load.py), the OpenAI client and auditwheel. DeepSpeed (the training peer) publishes no wheel:
# `DS_BUILD_OPS=0 pip wheel --no-deps deepspeed -w .whl/peers` builds its pure-Python one.
#
#   bash bench/peer_wheels.sh [--python-version 3.12]
#
# NOTE(tidal): only packages a torch + transformers image does not already hold. httpx, httpcore,
# certifi, idna, tqdm and typing_extensions are left out on purpose: the image has them (transformers
# and huggingface_hub need them) and a --no-deps install of other versions would replace them there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=3.12
[ "${1:-}" = "--python-version" ] && PYVER="$2"
DEST=.whl/peers
mkdir -p "$DEST"
PACKAGES=(fastapi starlette uvicorn pydantic pydantic-core annotated-types annotated-doc typing-inspection click h11
          anyio sniffio opentelemetry-api importlib-metadata zipp openai httpx2 httpcore2 jiter distro
          auditwheel pyelftools)
python3 -m pip download -q --no-deps --python-version "$PYVER" --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d "$DEST" "${PACKAGES[@]}"
ls "$DEST"
