#!/usr/bin/env bash
# Installs LiteLLM's proxy (PyPI) into its own virtual environment and prints the path of its
# `litellm` command; `cargo bench --bench proxy_overhead -- --litellm PATH` runs it as a peer.
# 1.108.7 is what pip resolves `litellm[proxy]<1.108.10` to on this index: later releases pin a
# litellm-proxy(-extras) release that the index does not have.
#
#     bench/litellm.sh [DIR]      # default DIR: target/peers/litellm
set -euo pipefail
VERSION=${LITELLM_VERSION:-1.108.7}
DIR=${1:-target/peers/litellm}
if [ ! -x "$DIR/bin/litellm" ]; then
  python3 -m venv "$DIR"
  "$DIR/bin/pip" install -q --disable-pip-version-check "litellm[proxy]==$VERSION"
fi
realpath "$DIR/bin/litellm"
