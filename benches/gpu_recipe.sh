#!/usr/bin/env bash
# The GPU profile of the recipe (recipes/smollm2-gpu.toml) on the lent GPU machine, which
# has no network and no ../shared: the CUDA binary, the SmolLM2 GGUF (in three parts: one
# call carries at most 64 MiB) and the data files travel in git-ignored folders under
# device/gpu/, one part per call, in consecutive calls (what a call leaves in the temporary
# folder stays while the machine is warm).
#
# Here:            scripts/build-cuda.sh [tests]; scripts/fetch-smollm2.sh; benches/gpu_recipe.sh pack
# GPU, calls 1-2:  carry device/gpu/partN                benches/gpu_recipe.sh stage
# GPU, call 3:     carry device/gpu/part3 [RUN_DIR]      benches/gpu_recipe.sh stage; benches/gpu_recipe.sh run RUN_DIR [--set ...]
#
# Runs may go side by side on the one GPU (`--stages` picks each one's stages of the recipe,
# LOG=NAME names its log).
#
# `resume CARRIED_RUN_DIR` puts a run directory that came back from an earlier session (see
# `results`) into the stash, to go on with it. `run` runs $RECIPE (default recipes/smollm2-gpu.toml) and writes its log to
# $OUT/gpu-recipe.txt; a run directory in the stash outlives the call while the machine is
# warm, and the recipe skips what is up to date. `results RUN_DIR NAME` packs its results
# without the adapters into $OUT/NAME.tar.gz (what comes back from a call is small). `bin
# NAME` prints the path of an unpacked binary of the stash (arenaflow, or training-test).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/gpu_env.sh
case "${1:-}" in
  pack)
    rm -rf device/gpu
    mkdir -p device/gpu/part1/data device/gpu/part2 device/gpu/part3
    cp -r ../shared/data/lmsys-arena ../shared/data/pandalm ../shared/data/hh-rlhf device/gpu/part1/data/
    split -n 3 .models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf device/gpu/gguf.
    mv device/gpu/gguf.aa device/gpu/part1/
    mv device/gpu/gguf.ab device/gpu/part2/
    mv device/gpu/gguf.ac device/gpu/part3/
    cp device/arenaflow.xz device/gpu/part2/
    if [ -f device/training-test.xz ]; then cp device/training-test.xz device/gpu/part1/; fi
    du -sh device/gpu/part*
    ;;
  stage)
    mkdir -p "$stash"
    for part in device/gpu/part*; do
      [ -d "$part" ] && cp -r "$part"/* "$stash/"
    done
    ls -l "$stash"
    ;;
  resume)
    # A run directory carried back here by `results` (teacher logits, CV, reports, no
    # adapters), into the stash as $stash/runs/NAME: its manifest forgets every output whose
    # files did not all travel (prepare/, folds/, adapters), and what travelled of such an
    # output is removed, so the recipe makes them again instead of stopping at "recorded
    # complete, but missing" or "exists but the manifest does not record it".
    # With --keep-trained, a fold's training whose adapter stayed behind is kept (its
    # metrics, for the report's loss curves) where that fold's CV travelled: the per-fold
    # runs of benches/gpu_ablation.sh skip such folds and never make it again.
    case "${3:-}" in
      "" | --keep-trained) ;;
      *) echo "gpu_recipe.sh resume RUN_DIR [--keep-trained]: not $3" >&2; exit 2 ;;
    esac
    mkdir -p "$stash/runs"
    dest=$stash/runs/$(basename "$2")
    rm -rf "$dest"
    cp -r "$2" "$dest"
    python3 - "$dest" "${3:-}" <<'PY'
import json, os, re, shutil, sys
run, keep_trained = sys.argv[1], sys.argv[2] == "--keep-trained"
path = os.path.join(run, "manifest.json")
manifest = json.load(open(path))
outputs = manifest["outputs"]
def travelled(name):
    entry = outputs.get(name)
    return entry is not None and all(os.path.exists(os.path.join(run, f["path"])) for f in entry.get("files", []))
def kept(name):
    m = re.fullmatch(r"train/(.+)/fold(\d+)", name)
    return keep_trained and m is not None and all(
        travelled(f"cv/{m[1]}/{part}/fold{m[2]}.parquet") for part in ("logits", "predictions"))
missing = [name for name in outputs if not travelled(name) and not kept(name)]
for name in missing:
    del outputs[name]
    # What did travel of it (e.g. training metrics without the adapter) goes too: the
    # runner refuses to write over an output the manifest does not record.
    leftover = os.path.join(run, name)
    if os.path.isdir(leftover):
        shutil.rmtree(leftover)
    elif os.path.exists(leftover):
        os.remove(leftover)
json.dump(manifest, open(path, "w"), indent=2)
print(f"{run}: {len(outputs)} outputs kept, {len(missing)} to make again: {', '.join(sorted(missing))}")
PY
    ;;
  bin)
    unpack "$stash/$2.xz" "$stash/bin/$2" >&2
    echo "$stash/bin/$2"
    ;;
  run)
    unpack "$stash/arenaflow.xz" "$stash/bin/arenaflow"
    smollm2
    run=$2
    shift 2
    recipe=${RECIPE:-recipes/smollm2-gpu.toml}
    data=$stash/data
    sets=(--set train="$data/lmsys-arena/train_sample.csv"
      --set pandalm="$data/pandalm/pandalm_testset-v1.json"
      --set hh_rlhf="$data/hh-rlhf/hh-rlhf_harmless-base_test.jsonl.gz")
    if grep -q '^test_file' "$recipe"; then sets+=(--set test_file="$data/lmsys-arena/test.csv"); fi
    "$stash/bin/arenaflow" run "$recipe" --run-dir "$run" "${sets[@]}" "$@" 2>&1 \
      | tee -a "${OUT:-.}/${LOG:-gpu-recipe}.txt"
    ;;
  results)
    # A run directory's results without its adapters, checkpoints and the inputs the recipe
    # rebuilds (prepare/, folds/): teacher logits, CV predictions, scores, reports, training
    # metrics and the manifest, as $OUT/NAME.tar.gz (what comes back is at most 16 MiB a file).
    parts=()
    for part in teacher cv report train scores manifest.json; do
      if [ -e "$2/$part" ]; then parts+=("$(basename "$2")/$part"); fi
    done
    tar -C "$(dirname "$2")" --exclude='adapter' --exclude='*.safetensors' --exclude='checkpoint*' \
      -czf "${OUT:-.}/${3:-results}.tar.gz" "${parts[@]}"
    ls -l "${OUT:-.}/${3:-results}.tar.gz"
    ;;
  *)
    echo "usage: benches/gpu_recipe.sh pack | stage | resume RUN_DIR [--keep-trained] | bin NAME | run RUN_DIR [--set ...] | results RUN_DIR [NAME]" >&2
    exit 2
    ;;
esac
