//! `arenaflow train`: a LoRA adapter (and score head) trained on rows of token ids, from
//! Parquet to a PEFT folder, through the `distill_step` operator itself (the command line
//! runs the same path as the plans). Resumable: checkpoints go beside the output
//! (`.NAME.checkpoint/`), and the same command continues after kill -9.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arenaflow_operators::distill_step::exec::DistillStep;
use arenaflow_operators::distill_step::TrainSettings;
use arenaflow_operators::scaffold::OperatorTable;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::prelude::{ParquetReadOptions, SessionConfig};

use crate::error::{EngineError, Result};
use crate::logits::write_parquet;
use crate::session::{execute, ArenaSession};

pub struct TrainOptions {
    pub settings: TrainSettings,
    pub input: PathBuf,
    pub output: PathBuf,
}

fn invalid(path: &Path, message: impl std::fmt::Display) -> EngineError {
    EngineError::Invalid(format!("{}: {message}", path.display()))
}

/// Where the CLI keeps checkpoints of `output`.
pub fn checkpoint_dir(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "adapter".into());
    output.with_file_name(format!(".{name}.checkpoint"))
}

/// Trains on every row of `opts.input` and writes the adapter to `opts.output` (a PEFT
/// folder, with `metrics.parquet`: one row per step and evaluation). Returns the metrics.
pub async fn run_train(opts: &TrainOptions) -> Result<Vec<RecordBatch>> {
    if opts.output.exists() {
        return Err(invalid(
            &opts.output,
            "already exists; refusing to overwrite it",
        ));
    }
    let mut settings = opts.settings.clone();
    settings.output = Some(opts.output.clone());
    let checkpoint = checkpoint_dir(&opts.output);
    settings.checkpoint_dir = Some(checkpoint.clone());
    let session = ArenaSession::with_config(SessionConfig::new().with_target_partitions(1));
    let ctx = &session.ctx;
    let input = opts.input.display().to_string();
    let with_file = |e: EngineError| invalid(&opts.input, e);
    ctx.register_parquet("train_rows", &input, ParquetReadOptions::default())
        .await
        .map_err(|e| with_file(e.into()))?;
    let has_order = ctx
        .table_provider("train_rows")
        .await?
        .schema()
        .field_with_name("order")
        .is_ok();
    let order = if has_order { "" } else { ", 'ab' AS \"order\"" };
    ctx.sql(&format!(
        "CREATE VIEW train_input AS SELECT *{order} FROM train_rows"
    ))
    .await
    .map_err(|e| with_file(e.into()))?;
    let rows = ctx.table_provider("train_input").await?;
    let operator = OperatorTable::try_new(DistillStep::new(settings), rows)
        .map_err(|e| with_file(e.into()))?;
    ctx.register_table("training", Arc::new(operator))?;
    let frame = ctx.sql("SELECT * FROM training").await?;
    let plan = frame.into_unoptimized_plan();
    let executed = execute(ctx.state(), plan).await.map_err(with_file)?;
    // Data-parallel ranks (torchrun's or SLURM's environment): rank 0 writes the outputs.
    let leader = arenaflow_operators::distill_step::exec::data_parallel_rank()
        .map_err(|e| invalid(&opts.output, e))?
        .is_none_or(|rv| rv.rank == 0);
    if leader {
        let metrics = opts.output.join("metrics.parquet");
        if let Some(first) = executed.batches.first() {
            write_parquet(&metrics, first.schema(), &executed.batches)?;
        }
        if checkpoint.exists() {
            std::fs::remove_dir_all(&checkpoint).map_err(|e| invalid(&checkpoint, e))?;
        }
    }
    Ok(executed.batches)
}
