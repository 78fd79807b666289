#!/usr/bin/env bash
# Builds the CUDA binary of arenaflow on a machine without a GPU (../shared/GPU.md) and
# packs it for the GPU machine: device/arenaflow.xz (device/ is git-ignored and is what
# the GPU runs carry). Target: sm_90 (H100/H200). CARGO_TARGET_DIR defaults to a folder
# beside the checkout so that the CPU and CUDA builds do not evict each other.
set -euo pipefail
cd "$(dirname "$0")/.."
# Through a variable: a failed set-up stops here instead of building without nvcc.
vars=$(scripts/cuda-toolchain.sh)
eval "$vars"
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$PWD/../cuda-target}
cargo build --release --features arenaflow-engine/cuda -p arenaflow-engine --bin arenaflow
mkdir -p device
strip -o device/arenaflow "$CARGO_TARGET_DIR/release/arenaflow"
xz -9e -T2 -f device/arenaflow
ls -l device/arenaflow.xz
# `scripts/build-cuda.sh tests`: also the models crate's training test binary (its
# ignored CUDA gradient test), packed as device/training-test.xz. On the GPU machine:
# ARENAFLOW_REPO=$PWD device/bin/training-test --ignored cuda --nocapture
if [ "${1:-}" = tests ]; then
  exe=$(cargo test --release --features cuda -p arenaflow-models --test training --no-run \
    --message-format=json | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "training":
        print(m["executable"])')
  strip -o device/training-test "$exe"
  xz -9e -T2 -f device/training-test
  ls -l device/training-test.xz
fi
