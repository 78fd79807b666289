#!/usr/bin/env bash
# The main job: the whole recipe (recipes/smollm2-cpu.toml) on the embedded default data,
# the real Kaggle sample (../shared/data/lmsys-arena/train_sample.csv) with PandaLM and
# HH-RLHF for post-pretraining, SmolLM2-135M-Instruct (fetched from PyPI) as teacher and
# student, cut down to finish in about 12 minutes on 2 CPU cores: prepare, folds,
# post-pretrain, a teacher per fold, teacher logits, calibration, distillation per fold,
# CV with TTA, fold averaging, predict (submission.csv) and the eval report (report.md,
# reliability and loss-curve PNGs). Outputs and manifest.json go to runs/default; run it
# again and every stage is up to date. Extra arguments go to `arenaflow run`
# (e.g. --set k=5).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/arenaflow/target}"
# Built as the tests build it (same features), so the two commands share one build.
cargo build --quiet --workspace --tests
scripts/fetch-smollm2.sh >/dev/null
"$CARGO_TARGET_DIR/debug/arenaflow" run recipes/smollm2-cpu.toml --run-dir runs/default "$@"
echo "report: runs/default/report/student/report.md (reliability.png, loss_curves.png beside it)"
echo "submission: runs/default/predict/student/submission.csv"
