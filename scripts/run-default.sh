#!/usr/bin/env bash
# The main job on the embedded default data: prepare + folds on the real Kaggle sample
# (../shared/data/lmsys-arena/train_sample.csv), printing counts per source and label and
# the fold x label table. Outputs and manifest.json go to runs/default.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/arenaflow/target}"
cargo run --quiet -p arenaflow-engine --bin arenaflow -- run plans/prepare.sql plans/folds.sql --run-dir runs/default "$@"
