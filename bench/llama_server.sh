#!/usr/bin/env bash
# Builds llama.cpp's own server, llama-server, from the llama.cpp sources that the
# llama-cpp-python sdist on PyPI vendors (no prebuilt llama.cpp can be downloaded here), and
# prints its path. bench/local_speed.py runs it as the peer.
#
#     bench/llama_server.sh [DIR]      # default DIR: target/peers; ~10 min on 2 cores
#
# The sdist is fetched from the package index's simple page rather than with
# `pip download --no-binary :all:`, which would first build cmake itself from source to read
# the package's metadata.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
DIR=${1:-target/peers}
mkdir -p "$DIR"
cd "$DIR"
if ! command -v cmake >/dev/null 2>&1; then
  python3 -m pip install -q --disable-pip-version-check cmake==4.4.5
fi
SRC="llama_cpp_python-$VERSION"
if [ ! -d "$SRC" ]; then
  python3 - "$VERSION" <<'PY'
import os, re, sys, urllib.parse, urllib.request
version = sys.argv[1]
index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
page = urllib.request.urlopen(f"{index}/llama-cpp-python/").read().decode()
name = f"llama_cpp_python-{version}.tar.gz"
url = next(u for u in re.findall(r'href="([^"]+)"', page) if name in u)
url = urllib.parse.urljoin(f"{index}/llama-cpp-python/", url.split("#")[0])
urllib.request.urlretrieve(url, name)
PY
  tar xzf "$SRC.tar.gz"
fi
# The CPU's own instruction sets, as -march=native would pick them, but never AMX: on machines
# whose kernel grants a process no AMX tile state (as in the sandbox here, whose Xeon lists
# amx_tile), a native build dies with SIGILL or SIGSEGV on its first matmul.
has() { grep -m1 '^flags' /proc/cpuinfo | grep -qw "$1" && echo ON || echo OFF; }
cmake -S "$SRC/vendor/llama.cpp" -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" \
  -DGGML_BMI2="$(has bmi2)" -DGGML_AVX_VNNI="$(has avx_vnni)" -DGGML_AVX512="$(has avx512f)" \
  -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)" \
  -DGGML_AVX512_BF16="$(has avx512_bf16)" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
cmake --build build --target llama-server -j "$(nproc)" >/dev/null
realpath build/bin/llama-server
