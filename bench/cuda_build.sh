#!/usr/bin/env bash
# Builds experient with `--features cuda` on a machine that has neither a CUDA toolkit nor a GPU
# (as the build machines here): the CUDA 13.0 compiler, headers and libraries come from NVIDIA's
# wheels on PyPI, and the driver library, which only a machine with an NVIDIA driver has, is
# replaced at link time by a stub that defines the driver API's symbols. cudarc links the driver
# dynamically, so the binary loads the real libcuda.so.1 where it runs. Prints the binary's path.
#
#     bench/cuda_build.sh [COMPUTE_CAP]   # default 90 (Hopper); 80 for Ampere, 89 for Ada
#
# With a real toolkit installed, `CUDA_COMPUTE_CAP=90 cargo build --release --features cuda` is
# all it takes. The binary runs with an NVIDIA driver for CUDA 13.0 or newer and cuBLAS,
# cuBLASLt, cuRAND and the CUDA 13 runtime where the loader finds them (bench/cuda_check.sh
# looks for them). The build goes to $CARGO_TARGET_DIR, by default target/cuda, so that it
# never replaces the CPU build in target/release.
set -euo pipefail
cd "$(dirname "$0")/.."
CAP=${1:-90}
TK=$PWD/target/cuda-toolkit
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}

if [ ! -x "$TK/bin/nvcc" ]; then
  rm -rf "$TK" "$TK.download" && mkdir -p "$TK.download"
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$TK.download" nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
  for w in "$TK.download"/*.whl; do python3 -m zipfile -e "$w" "$TK.download/unpacked"; done
  # Every wheel unpacks into nvidia/cu13/, a toolkit's own layout.
  mv "$TK.download/unpacked/nvidia/cu13" "$TK" && rm -rf "$TK.download"
  chmod +x "$TK"/bin/* "$TK"/nvvm/bin/*
  (cd "$TK/lib" && for f in *.so.*; do ln -sf "$f" "${f%%.so.*}.so"; done)
  ln -sfn lib "$TK/lib64"
fi

if [ ! -e "$TK/lib/stubs/libcuda.so" ]; then
  cargo fetch --locked -q
  SYS=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*/cudarc-0.19.*/src/driver/sys/mod.rs' | sort | tail -1)
  mkdir -p "$TK/lib/stubs"
  # The driver API as cudarc declares it: one function per name, never called.
  grep -oE '^\s+fn cu[A-Za-z0-9_]+' "$SYS" | awk '{print "int " $2 "(void) { return 999; }"}' \
    | sort -u >"$TK/lib/stubs/libcuda.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$TK/lib/stubs/libcuda.so" "$TK/lib/stubs/libcuda.c"
fi

export CUDA_PATH=$TK CUDA_HOME=$TK CUDA_ROOT=$TK NVCC=$TK/bin/nvcc CUDA_COMPUTE_CAP=$CAP
export PATH=$TK/bin:$PATH LIBRARY_PATH=$TK/lib:$TK/lib/stubs
cargo build --release --locked --features cuda >&2
echo "$CARGO_TARGET_DIR/release/experient"
