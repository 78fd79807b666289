//! Readers of the preference data sets users have, each into the canonical table, as SQL
//! table functions:
//!
//! | function | reads |
//! |---|---|
//! | `arena_csv(path [, source [, on_error]])` | Kaggle `train.csv` / `test.csv`, UltraFeedback in Kaggle format (`source` defaults to `kaggle`) |
//! | `arena_conversations(path [, on_error])` | `chatbot_arena_conversations` (Parquet, JSON, JSON lines) |
//! | `pandalm(path [, on_error])` | PandaLM test set JSON |
//! | `hh_rlhf(path, seed [, on_error])` | HH-RLHF JSON lines, optionally gzip |
//!
//! `on_error` is `fail` (the default: the first bad row stops the query with its file, row
//! and column) or `skip` (bad rows are left out, counted, and reported). An empty `path`
//! reads nothing, so a plan can leave an optional source out.

pub mod arena_csv;
pub mod canonical;
pub mod conversations;
pub mod hh_rlhf;
pub mod pandalm;

use std::fmt;
use std::io::Read;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{exec_err, plan_err, project_schema, Result, ScalarValue};
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use datafusion::prelude::SessionContext;
use futures::{stream, StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;

pub use canonical::{canonical_schema, comparisons_to_batch, Comparison};

use crate::error::SourceError;
use crate::inputs::InputTracker;

/// What a reader does with a row that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    Fail,
    Skip,
}

/// The rows of one file, and the rows left out under [`OnError::Skip`].
#[derive(Debug, Default)]
pub struct Parsed {
    pub rows: Vec<Comparison>,
    pub skipped: Vec<SourceError>,
}

impl Parsed {
    /// Keeps a row, or under the policy fails or counts its error.
    pub fn accept(
        &mut self,
        row: Result<Comparison, SourceError>,
        on_error: OnError,
    ) -> Result<(), SourceError> {
        match (row, on_error) {
            (Ok(row), _) => self.rows.push(row),
            (Err(e), OnError::Skip) => self.skipped.push(e),
            (Err(e), OnError::Fail) => return Err(e),
        }
        Ok(())
    }
}

/// A whole file as text: an error names the file when it is not UTF-8 or holds nothing.
pub(crate) fn file_text<'b>(
    file: &str,
    bytes: &'b [u8],
    expected: &str,
) -> Result<&'b str, SourceError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        SourceError::file(file, format!("invalid UTF-8 at byte {}", e.valid_up_to()))
    })?;
    if text.trim().is_empty() {
        return Err(SourceError::file(
            file,
            format!("the file is empty: expected {expected}"),
        ));
    }
    Ok(text)
}

/// Which reader, with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    ArenaCsv { source: String },
    Conversations,
    PandaLm,
    HhRlhf { seed: u64 },
}

impl SourceKind {
    /// The `source` column value of its rows.
    pub fn source_name(&self) -> &str {
        match self {
            SourceKind::ArenaCsv { source } => source,
            SourceKind::Conversations => "arena_conversations",
            SourceKind::PandaLm => "pandalm",
            SourceKind::HhRlhf { .. } => "hh_rlhf",
        }
    }

    /// Parses a whole file's bytes (already decompressed).
    pub fn parse(
        &self,
        file: &str,
        bytes: Bytes,
        on_error: OnError,
    ) -> Result<Parsed, SourceError> {
        match self {
            SourceKind::ArenaCsv { .. } => arena_csv::parse(file, &bytes, on_error),
            SourceKind::Conversations => conversations::parse(file, bytes, on_error),
            SourceKind::PandaLm => pandalm::parse(file, &bytes, on_error),
            SourceKind::HhRlhf { seed } => hh_rlhf::parse(file, &bytes, *seed, on_error),
        }
    }
}

/// Reads a file of any source kind into canonical record batches.
pub async fn read_source(
    ctx: &TaskContext,
    kind: &SourceKind,
    location: &str,
    on_error: OnError,
) -> Result<(Vec<RecordBatch>, Vec<SourceError>)> {
    let url = ListingTableUrl::parse(location)?;
    let store = ctx.runtime_env().object_store(url.object_store())?;
    let bytes = match store.get(url.prefix()).await {
        Ok(result) => result.bytes().await?,
        Err(object_store::Error::NotFound { .. }) => return exec_err!("{location}: no such file"),
        Err(e) => return exec_err!("{location}: cannot read: {e}"),
    };
    let source = kind.source_name().to_string();
    let (kind, file) = (kind.clone(), location.to_string());
    let parsed = tokio::task::spawn_blocking(move || {
        let bytes = if file.ends_with(".gz") {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(&bytes[..])
                .read_to_end(&mut out)
                .map_err(|e| SourceError::file(&file, format!("not valid gzip: {e}")))?;
            Bytes::from(out)
        } else {
            bytes
        };
        kind.parse(&file, bytes, on_error)
    })
    .await
    .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
    let parsed = parsed?;
    let batches = to_batches(&source, parsed.rows)?;
    Ok((batches, parsed.skipped))
}

/// Runs `work` on one contiguous part of `items` per core; each thread owns (and frees)
/// its part. Results come back in input order; a panicking worker panics the caller.
pub(crate) fn in_parallel<T: Send, R: Send>(
    mut items: Vec<T>,
    work: impl Fn(Vec<T>) -> R + Sync,
) -> Vec<R> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_worker = items.len().div_ceil(workers).max(1);
    let mut parts = Vec::with_capacity(workers);
    while items.len() > per_worker {
        let rest = items.split_off(per_worker);
        parts.push(std::mem::replace(&mut items, rest));
    }
    parts.push(items);
    std::thread::scope(|scope| {
        let work = &work;
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| scope.spawn(move || work(part)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// Canonical record batches of `rows`, built on all cores.
pub fn to_batches(source: &str, rows: Vec<Comparison>) -> Result<Vec<RecordBatch>> {
    let parts = in_parallel(rows, |part| {
        part.chunks(canonical::BATCH_ROWS)
            .map(|rows| comparisons_to_batch(source, rows))
            .collect::<Result<Vec<_>>>()
    });
    Ok(parts
        .into_iter()
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect())
}

/// A table function that reads one kind of source.
#[derive(Debug)]
pub struct SourceFunction {
    name: &'static str,
    inputs: InputTracker,
}

fn string_arg(function: &str, what: &str, expr: &Expr) -> Result<String> {
    match expr {
        Expr::Literal(
            ScalarValue::Utf8(Some(s))
            | ScalarValue::LargeUtf8(Some(s))
            | ScalarValue::Utf8View(Some(s)),
            _,
        ) => Ok(s.clone()),
        other => plan_err!("{function}: {what} must be a string literal, got {other}"),
    }
}

fn on_error_arg(function: &str, expr: Option<&Expr>) -> Result<OnError> {
    match expr
        .map(|e| string_arg(function, "on_error", e))
        .transpose()?
        .as_deref()
    {
        None | Some("fail") => Ok(OnError::Fail),
        Some("skip") => Ok(OnError::Skip),
        Some(other) => plan_err!("{function}: on_error must be 'fail' or 'skip', got '{other}'"),
    }
}

impl TableFunctionImpl for SourceFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let exprs = args.exprs();
        let name = self.name;
        let usage = match name {
            "arena_csv" => "arena_csv(path [, source [, on_error]])",
            "hh_rlhf" => "hh_rlhf(path, seed [, on_error])",
            "arena_conversations" => "arena_conversations(path [, on_error])",
            _ => "pandalm(path [, on_error])",
        };
        let max_args = usage.matches(',').count() + 1;
        if exprs.is_empty() || exprs.len() > max_args {
            return plan_err!("{name} takes {usage}, got {} arguments", exprs.len());
        }
        let location = string_arg(name, "path", &exprs[0])?;
        let (kind, on_error) = match name {
            "arena_csv" => {
                let source = exprs
                    .get(1)
                    .map(|e| string_arg(name, "source", e))
                    .transpose()?
                    .unwrap_or_else(|| "kaggle".into());
                (
                    SourceKind::ArenaCsv { source },
                    on_error_arg(name, exprs.get(2))?,
                )
            }
            "hh_rlhf" => {
                let seed = match exprs.get(1) {
                    Some(Expr::Literal(ScalarValue::Int64(Some(seed)), _)) if *seed >= 0 => {
                        *seed as u64
                    }
                    other => {
                        return plan_err!(
                            "hh_rlhf: seed must be a non-negative integer literal, got {other:?}"
                        )
                    }
                };
                (
                    SourceKind::HhRlhf { seed },
                    on_error_arg(name, exprs.get(2))?,
                )
            }
            "arena_conversations" => (SourceKind::Conversations, on_error_arg(name, exprs.get(1))?),
            _ => (SourceKind::PandaLm, on_error_arg(name, exprs.get(1))?),
        };
        if !location.is_empty() {
            self.inputs.record(&location);
        }
        Ok(Arc::new(SourceTable {
            kind,
            location,
            on_error,
            inputs: self.inputs.clone(),
        }))
    }
}

/// Registers the reader table functions; every file they open is recorded in `inputs`.
pub fn register_sources(ctx: &SessionContext, inputs: &InputTracker) {
    for name in ["arena_csv", "arena_conversations", "pandalm", "hh_rlhf"] {
        ctx.register_udtf(
            name,
            Arc::new(SourceFunction {
                name,
                inputs: inputs.clone(),
            }),
        );
    }
}

#[derive(Debug)]
struct SourceTable {
    kind: SourceKind,
    location: String,
    on_error: OnError,
    inputs: InputTracker,
}

#[async_trait]
impl TableProvider for SourceTable {
    fn schema(&self) -> SchemaRef {
        canonical_schema()
    }
    fn table_type(&self) -> TableType {
        TableType::Base
    }
    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let schema = project_schema(&canonical_schema(), projection)?;
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(Arc::new(SourceExec {
            kind: self.kind.clone(),
            location: self.location.clone(),
            on_error: self.on_error,
            projection: projection.cloned(),
            schema,
            properties,
            inputs: self.inputs.clone(),
        }))
    }
}

/// Reads one source file and streams its canonical rows.
#[derive(Debug)]
pub struct SourceExec {
    kind: SourceKind,
    location: String,
    on_error: OnError,
    projection: Option<Vec<usize>>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    inputs: InputTracker,
}

impl DisplayAs for SourceExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "SourceExec: kind={:?}, location={}, on_error={:?}",
            self.kind, self.location, self.on_error
        )
    }
}

impl ExecutionPlan for SourceExec {
    fn name(&self) -> &str {
        "SourceExec"
    }
    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }
    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }
    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }
    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            plan_err!("SourceExec has no children")
        }
    }
    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return exec_err!("SourceExec has one partition, asked for {partition}");
        }
        let (kind, location, on_error) = (self.kind.clone(), self.location.clone(), self.on_error);
        let (projection, inputs) = (self.projection.clone(), self.inputs.clone());
        let batches = async move {
            if location.is_empty() {
                return Ok::<_, datafusion::error::DataFusionError>(stream::iter(Vec::new()));
            }
            let (batches, skipped) = read_source(&context, &kind, &location, on_error).await?;
            if !skipped.is_empty() {
                tracing::warn!(
                    "{location}: skipped {} bad rows (on_error = 'skip'); first: {}",
                    skipped.len(),
                    skipped[0]
                );
            }
            inputs.record_skipped(&location, skipped.len());
            let batches = batches
                .into_iter()
                .map(|b| match &projection {
                    Some(p) => b.project(p).map_err(Into::into),
                    None => Ok(b),
                })
                .collect::<Vec<Result<RecordBatch>>>();
            Ok(stream::iter(batches))
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            stream::once(batches).try_flatten().boxed(),
        )))
    }
}
