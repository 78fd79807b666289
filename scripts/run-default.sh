#!/usr/bin/env bash
# The main job on the embedded default data: prepare + folds + tokenize on the real Kaggle sample
# (../shared/data/lmsys-arena/train_sample.csv), printing counts per source and label and
# the fold x label table. Outputs and manifest.json go to runs/default.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/arenaflow/target}"
# Built as the tests build it (same features), so the two commands share one build.
cargo build --quiet --workspace --tests
"$CARGO_TARGET_DIR/debug/arenaflow" run plans/prepare.sql plans/folds.sql plans/tokenize.sql --run-dir runs/default "$@"
