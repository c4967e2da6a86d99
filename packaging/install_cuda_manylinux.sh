#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# cibuildwheel's before-all on Linux: the CUDA compiler and runtime headers from NVIDIA's RHEL 8
# repository into a manylinux_2_28 (AlmaLinux 8) image, so that the release wheels compile the CUDA
# kernels there. Only what the build needs: nvcc, its C runtime front end, and the static runtime.
set -euo pipefail
CUDA_VERSION="${TIDAL_CUDA_VERSION:-13-0}"
case "$(uname -m)" in
  x86_64) repo_arch=x86_64 ;;
  aarch64) repo_arch=sbsa ;;
  *) echo "install_cuda_manylinux.sh: no CUDA repository for $(uname -m)" >&2; exit 1 ;;
esac
dnf install -y -q dnf-plugins-core
dnf config-manager --add-repo "https://developer.download.nvidia.com/compute/cuda/repos/rhel8/${repo_arch}/cuda-rhel8.repo"
dnf install -y -q "cuda-nvcc-${CUDA_VERSION}" "cuda-crt-${CUDA_VERSION}" "cuda-cudart-devel-${CUDA_VERSION}" \
  "cuda-cccl-${CUDA_VERSION}"
/usr/local/cuda/bin/nvcc --version | tail -1
