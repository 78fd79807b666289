//! The DataFusion operators of arenaflow, streaming record batches through the tokenizers
//! and the candle models of [`arenaflow_models`]. One stem per stage:
//!
//! | stage | plan | SQL function | module | tests |
//! |---|---|---|---|---|
//! | tokenize | `plans/tokenize.sql` | `tokenize(...)` | [`tokenize`] | `tests/tests/tokenize.rs`, `tests/slt/tokenize.slt` |
//! | teacher logits (4) | `plans/teacher_logits.sql`, `plans/teacher_merge.sql` | `teacher_forward(...)` | [`teacher_forward`] | `tests/tests/teacher_forward.rs`, `tests/slt/teacher_forward.slt` |
//! | calibration (4.5) | `plans/calibrate.sql` | `fold_logits(...)` (with the SQL functions `fit_calibration`, `calibrate`) | [`fold_tables`] | `tests/tests/recipe.rs`, `tests/slt/calibration.slt` |
//! | fold averaging (6) | `plans/average.sql` | `average_adapters(...)` | [`average`] | `tests/tests/recipe.rs` |
//! | quantization (7) | `plans/quantize.sql` | `quantize(...)` | [`quantize`] | `tests/tests/models.rs`, `operators/models/tests/gptq.rs` |
//! | eval report (8) | `plans/eval_report.sql` | `fold_metrics(...)`, `COPY ... STORED AS PNG` / `MD` | [`report_files`], [`charts`] | `tests/tests/recipe.rs` |
//! | training (1, 3, 5) | `plans/post_pretrain.sql`, `plans/train_teacher.sql`, `plans/distill.sql` | `distill_step(...)`, `with_teacher_logits(...)` | [`distill_step`] | `tests/tests/train.rs`, `operators/models/tests/training.rs` |
//!
//! What they share: [`scaffold`] (the plan node, its metrics and its table), [`args`] (the
//! table functions' argument parser), [`run_state`] (per-run state as session
//! extensions), [`token_rows`] (column names, the checked token-row reader, batching by a
//! token budget) and [`commits`] (batch-by-batch commits to resume from).

pub mod args;
pub mod average;
pub mod charts;
pub mod commits;
pub mod distill_step;
pub mod error;
pub mod fold_tables;
pub mod quantize;
pub mod report_files;
pub mod run_state;
pub mod scaffold;
pub mod teacher_forward;
pub mod token_rows;
pub mod tokenize;

use std::sync::Arc;

use datafusion::prelude::SessionContext;

pub use error::{OperatorError, Result};

/// Registers the operators' SQL table functions and the report file formats (`STORED AS
/// PNG`, `STORED AS MD`) on a session.
pub fn register(ctx: &SessionContext) {
    {
        let state = ctx.state_ref();
        let mut state = state.write();
        for kind in [
            report_files::ReportKind::Png,
            report_files::ReportKind::Markdown,
        ] {
            // With overwrite on, registering cannot fail.
            let _ =
                state.register_file_format(Arc::new(report_files::ReportFormatFactory(kind)), true);
        }
    }
    ctx.register_udtf("tokenize", Arc::new(tokenize::exec::TokenizeFunction));
    ctx.register_udtf(
        "teacher_forward",
        Arc::new(teacher_forward::exec::TeacherForwardFunction),
    );
    ctx.register_udtf(
        "distill_step",
        Arc::new(distill_step::exec::DistillStepFunction),
    );
    ctx.register_udtf(
        "average_adapters",
        Arc::new(average::AverageAdaptersFunction),
    );
    ctx.register_udtf("quantize", Arc::new(quantize::QuantizeFunction));
    ctx.register_udtf("fold_logits", Arc::new(fold_tables::FOLD_LOGITS));
    ctx.register_udtf("fold_metrics", Arc::new(fold_tables::FOLD_METRICS));
    ctx.register_udtf(
        "with_teacher_logits",
        Arc::new(distill_step::teachers::WithTeacherLogitsFunction),
    );
}
