//! SQL functions of arenaflow: turns parsing, strict labels, folds, softmax, log loss,
//! calibration and symmetrization (TTA), Markdown table rows for reports.

pub mod calibrate;
pub mod ece;
pub mod ensure;
pub mod exact_sum;
pub mod fold;
pub mod label;
pub mod lists;
pub mod log_loss;
pub mod markdown;
pub mod shard;
pub mod softmax;
pub mod symmetrize;
pub mod turns;

use datafusion::logical_expr::{AggregateUDF, ScalarUDF, WindowUDF};
use datafusion::prelude::SessionContext;

pub use fold::{assign_folds, fold_key};
pub use label::{one_hot_label, swap, LABEL_A, LABEL_B, LABEL_TIE};
pub use turns::{append_turns, parse_turns, turns_type, TurnsError};

/// Registers every arenaflow function on a session.
pub fn register_all(ctx: &SessionContext) {
    ctx.register_udf(ScalarUDF::from(turns::ArenaTurns::default()));
    ctx.register_udf(ScalarUDF::from(label::ArenaLabel::default()));
    ctx.register_udf(ScalarUDF::from(label::SwapLabel::default()));
    ctx.register_udf(ScalarUDF::from(softmax::Softmax3::default()));
    ctx.register_udf(ScalarUDF::from(softmax::Argmax3::default()));
    ctx.register_udf(ScalarUDF::from(ensure::Ensure::default()));
    ctx.register_udf(ScalarUDF::from(markdown::MarkdownRow::default()));
    ctx.register_udaf(AggregateUDF::from(log_loss::LogLoss::default()));
    ctx.register_udaf(AggregateUDF::from(ece::ExpectedCalibrationError::default()));
    ctx.register_udaf(AggregateUDF::from(calibrate::FitCalibration::default()));
    ctx.register_udf(ScalarUDF::from(calibrate::Calibrate::default()));
    ctx.register_udaf(AggregateUDF::from(symmetrize::Symmetrize::default()));
    ctx.register_udwf(WindowUDF::from(fold::FoldOf::default()));
    ctx.register_udf(ScalarUDF::from(shard::ShardOf::default()));
}
