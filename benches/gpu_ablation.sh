#!/usr/bin/env bash
# Issue 14's ablation (recipes/quality-ablation.toml) on the one GPU as three runs side by
# side, one per variant, each in its own copy of part 1's run directory ($stash/runs/quality,
# from `benches/gpu_recipe.sh resume runs/gpu/quality`): the CE-only baseline (stages 1-6),
# the student from raw teacher logits (1-3, 7-9) and the student with information-gain
# weights (1-3, 10-12). Three runs fill the GPU better than one: about 10,000 tokens/s each,
# 30,000 together, against 16,000-17,500 for one run alone (2026-12-04). Once its variant is
# done, the third run averages its 5 fold adapters and scores them on PandaLM
# (recipes/quality-students.toml stages 7-16 with averaged=student_kd_cal_ig).
#
# GPU calls 1-3: benches/gpu_recipe.sh stage (carry device/gpu/partN; call 1 also carries
#                runs/gpu/quality and runs `benches/gpu_recipe.sh resume runs/gpu/quality`)
# then, in as many calls as it takes (each goes on where the last stopped, while the
# machine stays warm):
#                benches/gpu_ablation.sh run [SECONDS]   # default 480
# Each call leaves $OUT/q_{raw,kd,ig}.tar.gz (`benches/gpu_recipe.sh results`) and the runs'
# logs, $OUT/{raw,kd,ig}-HHMM.txt. SECONDS bounds the runs, not the packing after them: give
# each call about 40 s less than its limit and than the session's device time left. If the
# machine is lost between calls, carry the q_* trees back, `benches/gpu_recipe.sh resume`
# each (they land where this script looks), and go on.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/gpu_env.sh
case "${1:-}" in
  run)
    limit=${2:-480}
    deadline=$((SECONDS + limit))
    when=$(date +%H%M)
    declare -A stages=([raw]=1-6 [kd]=1-3,7-9 [ig]=1-3,10-12)
    for v in raw kd ig; do
      [ -d "$stash/runs/q_$v" ] || cp -r "$stash/runs/quality" "$stash/runs/q_$v"
    done
    for v in raw kd ig; do
      run=(benches/gpu_recipe.sh run "$stash/runs/q_$v" --stages "${stages[$v]}")
      if [ "$v" = ig ]; then
        average=(benches/gpu_recipe.sh run "$stash/runs/q_ig" --stages 7-16
          --set averaged=student_kd_cal_ig)
        # The averaging gets what is left of the call's time, if a minute is left.
        (RECIPE=recipes/quality-ablation.toml LOG=$v-$when timeout -k 15 "$limit" "${run[@]}" \
          && [ $((deadline - SECONDS)) -gt 60 ] \
          && RECIPE=recipes/quality-students.toml LOG=average-$when \
            timeout -k 15 $((deadline - SECONDS)) "${average[@]}") >/dev/null 2>&1 &
      else
        (RECIPE=recipes/quality-ablation.toml LOG=$v-$when timeout -k 15 "$limit" "${run[@]}") \
          >/dev/null 2>&1 &
      fi
      # One unpacks the binary and puts the model together before the others start.
      sleep 3
    done
    # `timeout` signals its command's whole process group: arenaflow and tee end with it.
    wait || true
    for v in raw kd ig; do benches/gpu_recipe.sh results "$stash/runs/q_$v" "q_$v"; done
    grep -h 'plan runs\|dev log loss\|^error' "${OUT:-.}"/*-"$when".txt | cut -c1-200 || true
    ;;
  *)
    echo "usage: benches/gpu_ablation.sh run [SECONDS]" >&2
    exit 2
    ;;
esac
