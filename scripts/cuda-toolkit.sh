#!/usr/bin/env bash
# Installs a CUDA toolkit (nvcc and the CUDA headers and libraries) on a Debian 12 machine, so
# that `cargo build --features cuda` compiles, with or without a GPU.
#
# Debian's `nvidia-cuda-toolkit` (11.8) lives in the `contrib non-free` components of the same
# archive the machine already uses; this adds those components to the apt sources (once) and
# installs it. nvcc 11.8 knows compute capabilities up to 90 but not `compute_90a`, which
# candle asks for on 90, so builds here use CUDA_COMPUTE_CAP=80: PTX for 8.0 runs on newer
# cards (A100, H100, H200) through the driver's JIT.
#
#   bash scripts/cuda-toolkit.sh && CUDA_COMPUTE_CAP=80 cargo build --release --features cuda --examples
set -euo pipefail

if command -v nvcc >/dev/null 2>&1; then
  echo "nvcc present: $(nvcc --version | tail -n 1)"
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

sources=/etc/apt/sources.list.d/debian.sources
if [ -f "$sources" ]; then
  # deb822 format: add contrib and non-free to every "Components: main" line.
  if ! grep -q "non-free" "$sources"; then
    $sudo sed -i -E 's/^(Components: .*main)$/\1 contrib non-free/' "$sources"
  fi
elif [ -f /etc/apt/sources.list ]; then
  if ! grep -q "non-free" /etc/apt/sources.list; then
    $sudo sed -i -E 's/^(deb .* main)$/\1 contrib non-free/' /etc/apt/sources.list
  fi
else
  echo "no apt sources found: install a CUDA toolkit (nvcc) by hand" >&2
  exit 2
fi

export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit >/dev/null
echo "installed: $(nvcc --version | tail -n 1)"
