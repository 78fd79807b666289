#!/usr/bin/env bash
# Issue 14's ablation (recipes/quality-ablation.toml) on the one GPU, one variant after the
# other, each in its own copy of part 1's run directory ($stash/runs/quality, from
# `benches/gpu_recipe.sh resume runs/gpu/quality`): the CE-only baseline `raw` (stages 1-6),
# the student from raw teacher logits `kd` (1-3, 7-9) and the student with information-gain
# weights `ig` (1-3, 10-12). After `ig`, its 5 fold adapters are averaged and scored on
# PandaLM (recipes/quality-students.toml stages 7-18 with averaged=student_kd_cal_ig: the int8 delta model too).
#
# One after the other, not side by side: three runs side by side made 7,400 tokens/s each,
# 22,000 together, against 18,800-19,600 for one run alone (2026-12-04, fourth session). One
# alone trains a fold in about 135 s; a variant (5 folds, CV, report) takes about 700 s,
# more than one call of 10 minutes, and the machine goes back 30 s after a call: the fifth
# session lost it twice between two calls, with the adapters of the folds it had trained.
# So each fold runs on its own (`arenaflow run --folds N`: its training, then its CV), and
# what comes back after each call (`benches/gpu_recipe.sh results`, no adapters) holds every
# finished fold's CV: a later call, on this machine or a fresh one, goes on with the folds
# whose CV is missing, and runs the report once all five are there. Training is
# deterministic run to run (fold 0 gave 1.0654 on three machines), so a fold made again
# gives the same adapter and the same CV.
#
# GPU calls 1-3: benches/gpu_recipe.sh stage (carry device/gpu/partN; call 1 also carries
#                runs/gpu/quality and runs `benches/gpu_recipe.sh resume runs/gpu/quality`)
# then, in as many calls as it takes:
#                benches/gpu_ablation.sh run [SECONDS] [VARIANT...]   # default 480, raw kd ig
# Each call leaves $OUT/q_VARIANT.tar.gz for the variants it touched and their logs,
# $OUT/VARIANT-HHMM.txt. SECONDS bounds the runs, not the packing after them: give each call
# about 40 s less than its limit and than the session's device time left. If the machine is
# lost between calls, unpack each q_* tree under runs/gpu/ here, carry it with part 1 and
# `benches/gpu_recipe.sh resume runs/gpu/q_VARIANT --keep-trained` it (its finished folds
# stay finished), then go on. The averaging after `ig` needs its five adapters on one
# machine: it runs only when all five are there.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/gpu_env.sh
case "${1:-}" in
  run)
    deadline=$((SECONDS + ${2:-480}))
    shift
    [ $# -eq 0 ] || shift
    variants=("$@")
    [ ${#variants[@]} -gt 0 ] || variants=(raw kd ig)
    when=$(date +%H%M)
    # Per variant: the model it trains, and its recipe stages: training, CV (per fold), report.
    declare -A model=([raw]=teacher_raw [kd]=student_kd [ig]=student_kd_cal_ig)
    declare -A stages=([raw]="4 5 6" [kd]="7 8 9" [ig]="10 11 12")
    folds=$(grep -m1 '^k = ' recipes/quality-ablation.toml | cut -d' ' -f3)
    touched=()
    step() { # LOG and stages: runs them while time is left
      local left=$((deadline - SECONDS))
      [ "$left" -gt 60 ] || return 1
      RECIPE=$recipe LOG=$log timeout -k 15 "$left" benches/gpu_recipe.sh run "$run" "$@" >/dev/null 2>&1
    }
    for v in "${variants[@]}"; do
      [ -n "${stages[$v]:-}" ] || { echo "gpu_ablation.sh: no variant $v (raw, kd, ig)" >&2; exit 2; }
      read -r train cv report <<<"${stages[$v]}"
      run=$stash/runs/q_$v
      [ -d "$run" ] || cp -r "$stash/runs/quality" "$run"
      touched+=("$v")
      recipe=recipes/quality-ablation.toml
      log=$v-$when
      done_folds=0
      for ((fold = 0; fold < folds; fold++)); do
        if python3 -c 'import json, sys; o = json.load(open(sys.argv[1]))["outputs"].get(sys.argv[2]); sys.exit(0 if o and o.get("status") == "complete" else 1)' \
          "$run/manifest.json" "cv/${model[$v]}/predictions/fold$fold.parquet"; then
          done_folds=$((done_folds + 1))
          continue
        fi
        step --stages "1-3,$train,$cv" --folds "$fold" || break 2
        done_folds=$((done_folds + 1))
      done
      [ "$done_folds" -eq "$folds" ] || break
      step --stages "$report" || break
      if [ "$v" = ig ]; then
        adapters=$(find "$run/train/${model[$v]}" -mindepth 2 -maxdepth 2 -name adapter -type d 2>/dev/null | wc -l)
        if [ "$adapters" -eq "$folds" ]; then
          recipe=recipes/quality-students.toml log=average-$when
          step --stages 7-18 --set averaged=student_kd_cal_ig || break
        else
          echo "averaging skipped: $adapters of $folds adapters on this machine" | tee -a "${OUT:-.}/$log.txt"
        fi
      fi
    done
    for v in "${touched[@]}"; do benches/gpu_recipe.sh results "$stash/runs/q_$v" "q_$v"; done
    grep -h 'plan runs\|dev log loss\|^error\|skipped' "${OUT:-.}"/*-"$when".txt 2>/dev/null | cut -c1-200 || true
    ;;
  *)
    echo "usage: benches/gpu_ablation.sh run [SECONDS] [raw|kd|ig ...]" >&2
    exit 2
    ;;
esac
