//! `arenaflow logits`: a model's 3 logits for rows of token ids, from Parquet to Parquet,
//! through the `teacher_forward` operator itself (the check from outside the test suite
//! runs the same path as the plans).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arenaflow_operators::scaffold::OperatorTable;
use arenaflow_operators::teacher_forward::exec::TeacherForward;
use arenaflow_operators::teacher_forward::{ForwardStats, TeacherSettings};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::prelude::{ParquetReadOptions, SessionConfig};

use crate::error::{EngineError, Result};
use crate::session::{execute, ArenaSession};

pub struct LogitsOptions {
    pub teacher: TeacherSettings,
    pub input: PathBuf,
    pub output: PathBuf,
    /// Time each section of the forward pass (synchronising the device around each).
    pub profile: bool,
}

fn invalid(path: &Path, message: impl std::fmt::Display) -> EngineError {
    EngineError::Invalid(format!("{}: {message}", path.display()))
}

/// The rows of the input in file order (one partition), as `teacher_forward` reads them:
/// with the input's `order` where it has one (each (id, order) must come once), else `ab`.
fn input_view(has_order: bool) -> String {
    let order = if has_order { "\"order\"" } else { "'ab'" };
    format!(
        "CREATE VIEW logits_input AS SELECT arrow_cast(id, 'Utf8') AS id, {order} AS \"order\", \
         input_ids, row_number() OVER () AS input_position FROM token_rows"
    )
}

/// Runs the model over every row (`id`, `input_ids`) of `opts.input` with the
/// `teacher_forward` operator (batched by length under the token budget) and writes `id`,
/// `logits` (3 x f32) in input order; the file appears only when complete. The figures
/// exclude loading (and the warm-up batch).
pub async fn run_logits(opts: &LogitsOptions) -> Result<ForwardStats> {
    let session = ArenaSession::with_config(SessionConfig::new().with_target_partitions(1));
    let ctx = &session.ctx;
    let input = opts.input.display().to_string();
    let with_file = |e: EngineError| invalid(&opts.input, e);
    ctx.register_parquet("token_rows", &input, ParquetReadOptions::default())
        .await
        .map_err(|e| with_file(e.into()))?;
    let has_order = ctx
        .table_provider("token_rows")
        .await?
        .schema()
        .field_with_name("order")
        .is_ok();
    ctx.sql(&input_view(has_order))
        .await
        .map_err(|e| with_file(e.into()))?;
    let rows = ctx.table_provider("logits_input").await?;
    let operator = OperatorTable::try_new(
        TeacherForward {
            settings: opts.teacher.clone(),
        },
        rows,
    )
    .map_err(|e| with_file(e.into()))?;
    ctx.register_table("logits", Arc::new(operator))?;
    arenaflow_operators::teacher_forward::profile::take();
    arenaflow_operators::teacher_forward::profile::enable(opts.profile);
    let frame = ctx
        .sql("SELECT id, logits FROM logits ORDER BY input_position")
        .await?;
    let schema = Arc::new(frame.schema().as_arrow().clone());
    let plan = frame.into_unoptimized_plan();
    let executed = execute(ctx.state(), plan).await.map_err(with_file)?;
    let mut stats = executed
        .passes
        .into_iter()
        .next()
        .ok_or_else(|| EngineError::Invalid("the plan ran no teacher_forward pass".into()))?;
    stats.operator = "logits".into();
    stats.profile = arenaflow_operators::teacher_forward::profile::take()
        .into_iter()
        .map(|(section, (seconds, _))| (section, seconds))
        .collect();
    write_parquet(&opts.output, schema, &executed.batches)?;
    Ok(stats)
}

/// Writes `batches` to a Parquet file whole or not at all (through `FILE.partial`).
pub fn write_parquet(
    path: &Path,
    schema: datafusion::arrow::datatypes::SchemaRef,
    batches: &[datafusion::arrow::record_batch::RecordBatch],
) -> Result<()> {
    let partial = path.with_extension("parquet.partial");
    let write = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let file = File::create(&partial)?;
        let mut writer = ArrowWriter::try_new(file, schema, None)?;
        for batch in batches {
            writer.write(batch)?;
        }
        writer.close()?;
        std::fs::rename(&partial, path)?;
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        invalid(path, e)
    })
}
