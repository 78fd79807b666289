#!/usr/bin/env bash
# Issue 14's ablation (recipes/quality-ablation.toml) on the one GPU, one variant after the
# other, each in its own copy of part 1's run directory ($stash/runs/quality, from
# `benches/gpu_recipe.sh resume runs/gpu/quality`): the CE-only baseline `raw` (stages 1-6),
# the student from raw teacher logits `kd` (1-3, 7-9) and the student with information-gain
# weights `ig` (1-3, 10-12). After `ig`, its 5 fold adapters are averaged and scored on
# PandaLM (recipes/quality-students.toml stages 7-16 with averaged=student_kd_cal_ig).
#
# One after the other, not side by side: three runs side by side made 7,400 tokens/s each,
# 22,000 together, against 18,800-19,600 for one run alone (2026-12-04, fourth session), so
# a variant took 3x longer to finish, and an unfinished variant is lost with the machine
# (its 20 MB adapters cannot come back; CV runs only after the five folds). One alone
# trains a fold in about 135 s and finishes a variant (5 folds, CV, report) in about 700 s.
#
# GPU calls 1-3: benches/gpu_recipe.sh stage (carry device/gpu/partN; call 1 also carries
#                runs/gpu/quality and runs `benches/gpu_recipe.sh resume runs/gpu/quality`)
# then, in as many calls as it takes (each goes on where the last stopped, from the
# training's checkpoints, while the machine stays warm):
#                benches/gpu_ablation.sh run [SECONDS] [VARIANT...]   # default 480, raw kd ig
# Each call leaves $OUT/q_VARIANT.tar.gz (`benches/gpu_recipe.sh results`) for the variants
# it touched and their logs, $OUT/VARIANT-HHMM.txt. SECONDS bounds the runs, not the
# packing after them: give each call about 40 s less than its limit and than the session's
# device time left. If the machine is lost between calls, carry the q_* trees back,
# `benches/gpu_recipe.sh resume` each (they land where this script looks), and go on.
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
    declare -A stages=([raw]=1-6 [kd]=1-3,7-9 [ig]=1-3,10-12)
    touched=()
    for v in "${variants[@]}"; do
      [ -n "${stages[$v]:-}" ] || { echo "gpu_ablation.sh: no variant $v (raw, kd, ig)" >&2; exit 2; }
      left=$((deadline - SECONDS))
      [ "$left" -gt 60 ] || break
      [ -d "$stash/runs/q_$v" ] || cp -r "$stash/runs/quality" "$stash/runs/q_$v"
      touched+=("$v")
      # `timeout` signals its command's whole process group: arenaflow and tee end with it.
      RECIPE=recipes/quality-ablation.toml LOG=$v-$when timeout -k 15 "$left" \
        benches/gpu_recipe.sh run "$stash/runs/q_$v" --stages "${stages[$v]}" >/dev/null 2>&1 \
        || break
      if [ "$v" = ig ]; then
        left=$((deadline - SECONDS))
        [ "$left" -gt 60 ] || break
        RECIPE=recipes/quality-students.toml LOG=average-$when timeout -k 15 "$left" \
          benches/gpu_recipe.sh run "$stash/runs/q_ig" --stages 7-16 \
          --set averaged=student_kd_cal_ig >/dev/null 2>&1 || break
      fi
    done
    for v in "${touched[@]}"; do benches/gpu_recipe.sh results "$stash/runs/q_$v" "q_$v"; done
    grep -h 'plan runs\|dev log loss\|^error' "${OUT:-.}"/*-"$when".txt 2>/dev/null | cut -c1-200 || true
    ;;
  *)
    echo "usage: benches/gpu_ablation.sh run [SECONDS] [raw|kd|ig ...]" >&2
    exit 2
    ;;
esac
