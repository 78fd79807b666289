#!/usr/bin/env bash
# The GPU profile of the recipe (recipes/smollm2-gpu.toml) on the lent GPU machine, which
# has no network and no ../shared: the CUDA binary, the SmolLM2 GGUF (two parts: one call
# carries at most 64 MiB) and the data files travel in git-ignored folders under device/,
# in two consecutive calls (what a call leaves in the temporary folder stays while the
# machine is warm).
#
# Here:         scripts/build-cuda.sh; scripts/fetch-smollm2.sh; benches/gpu_recipe.sh pack
# GPU, call 1:  carry device/arenaflow.xz device/gpu/part1     benches/gpu_recipe.sh stage
# GPU, call 2:  carry device/gpu/part2 [RUN_DIR]               benches/gpu_recipe.sh run RUN_DIR [--set ...]
#
# `run` writes its log to $OUT/gpu-recipe.txt; a run directory under $OUT comes back, and
# carried in again it resumes: the recipe skips what is up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
# The system's temporary folder on the GPU machine: it outlives one call while the machine
# stays warm.
stash=$(dirname "$(mktemp -u)")/arenaflow-gpu
case "${1:-}" in
  pack)
    rm -rf device/gpu
    mkdir -p device/gpu/part1/data device/gpu/part2
    cp -r ../shared/data/lmsys-arena ../shared/data/pandalm ../shared/data/hh-rlhf device/gpu/part1/data/
    split -b 50000000 .models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf device/gpu/gguf.
    mv device/gpu/gguf.aa device/gpu/part1/
    mv device/gpu/gguf.ab device/gpu/part2/
    du -sh device/gpu/part1 device/gpu/part2 device/arenaflow.xz
    ;;
  stage)
    mkdir -p "$stash"
    cp -r device/gpu/part1/* device/arenaflow.xz "$stash/"
    ls -l "$stash"
    ;;
  run)
    . benches/gpu_env.sh
    unpack "$stash/arenaflow.xz" "$stash/bin/arenaflow"
    mkdir -p .models/smollm2
    cat "$stash/gguf.aa" device/gpu/part2/gguf.ab > .models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    run=$2
    shift 2
    data=$stash/data
    "$stash/bin/arenaflow" run recipes/smollm2-gpu.toml --run-dir "$run" \
      --set train="$data/lmsys-arena/train_sample.csv" --set test_file="$data/lmsys-arena/test.csv" \
      --set pandalm="$data/pandalm/pandalm_testset-v1.json" \
      --set hh_rlhf="$data/hh-rlhf/hh-rlhf_harmless-base_test.jsonl.gz" \
      "$@" 2>&1 | tee "${OUT:-.}/gpu-recipe.txt"
    ;;
  *)
    echo "usage: benches/gpu_recipe.sh pack | stage | run RUN_DIR [--set ...]" >&2
    exit 2
    ;;
esac
