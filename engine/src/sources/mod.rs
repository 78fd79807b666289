//! Readers of the preference data sets users have, each into the canonical table, as SQL
//! table functions:
//!
//! | function | reads |
//! |---|---|
//! | `arena_csv(path [, source [, on_error [, max_skipped]]])` | Kaggle `train.csv` / `test.csv`, UltraFeedback in Kaggle format (`source` defaults to `kaggle`) |
//! | `arena_conversations(path [, on_error [, max_skipped]])` | `chatbot_arena_conversations` (Parquet, JSON, JSON lines) |
//! | `pandalm(path [, on_error [, max_skipped]])` | PandaLM test set JSON |
//! | `hh_rlhf(path, seed [, on_error [, max_skipped]])` | HH-RLHF JSON lines, optionally gzip |
//!
//! `on_error` is `fail` (the default: the first bad row stops the query with its file, row
//! and column) or `skip` (bad rows are left out, counted, and reported; more than
//! `max_skipped` of a file's rows, 0.01 by default, fail the query). A file with no data
//! rows is an error. An empty `path`
//! reads nothing, so a plan can leave an optional source out.

pub mod arena_csv;
pub mod canonical;
pub mod conversations;
pub mod hh_rlhf;
pub mod pandalm;

use std::io::Read;
use std::sync::Arc;

use arenaflow_operators::args::Args;
use arenaflow_operators::run_state::RunInputs;
use bytes::Bytes;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{exec_err, plan_err, Result};
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::prelude::SessionContext;
use futures::{stream, StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;

pub use canonical::{canonical_schema, comparisons_to_batch, Comparison};

use crate::error::SourceError;

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

/// The UTF-16 encoding a byte order mark names, if any.
fn utf16(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [0xff, 0xfe, ..] => Some("UTF-16 little-endian"),
        [0xfe, 0xff, ..] => Some("UTF-16 big-endian"),
        _ => None,
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
        Err(_) if std::path::Path::new(location).is_dir() => {
            return exec_err!("{location}: is a folder; give the file")
        }
        Err(object_store::Error::NotFound { .. }) => return exec_err!("{location}: no such file"),
        Err(e) => {
            return exec_err!(
                "{location}: cannot read: {}",
                crate::storage::explain(&e.to_string())
            )
        }
    };
    let gzip = bytes.starts_with(&[0x1f, 0x8b]);
    if gzip && !location.ends_with(".gz") {
        return exec_err!(
            "{location}: the file is gzip-compressed; name it with .gz at the end (e.g. train.csv.gz) and it is read as such"
        );
    }
    if let Some(encoding) = utf16(&bytes) {
        return exec_err!(
            "{location}: the file is {encoding} (its byte order mark says so); save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)"
        );
    }
    let source = kind.source_name().to_string();
    let (kind, file) = (kind.clone(), location.to_string());
    let parsed = tokio::task::spawn_blocking(move || {
        let bytes = if gzip {
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
    usage: &'static str,
}

fn on_error_arg(args: &Args, i: usize) -> Result<OnError> {
    Ok(args
        .choice(
            i,
            "on_error",
            &[("fail", OnError::Fail), ("skip", OnError::Skip)],
        )?
        .unwrap_or(OnError::Fail))
}

impl TableFunctionImpl for SourceFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let args = Args::new(self.usage, &args)?;
        let location = args.required_string(0, "path")?;
        let (kind, policy_at) = match args.function() {
            "arena_csv" => {
                let source = args.string(1, "source")?.unwrap_or_else(|| "kaggle".into());
                (SourceKind::ArenaCsv { source }, 2)
            }
            "hh_rlhf" => {
                let Some(seed) = args.integer(1, "seed", 0)? else {
                    return plan_err!("{}: seed is required", self.usage);
                };
                (SourceKind::HhRlhf { seed: seed as u64 }, 2)
            }
            "arena_conversations" => (SourceKind::Conversations, 1),
            _ => (SourceKind::PandaLm, 1),
        };
        let on_error = on_error_arg(&args, policy_at)?;
        let max_skipped = args
            .fraction(policy_at + 1, "max_skipped")?
            .unwrap_or(DEFAULT_MAX_SKIPPED);
        if !location.is_empty() {
            args.record_input(&location);
        }
        let file = SourceFile {
            kind,
            location,
            on_error,
            max_skipped,
            schema: canonical_schema(),
        };
        Ok(Arc::new(StreamingTable::try_new(
            canonical_schema(),
            vec![Arc::new(file)],
        )?))
    }
}

/// Registers the reader table functions.
pub fn register_sources(ctx: &SessionContext) {
    for usage in [
        "arena_csv(path [, source [, on_error [, max_skipped]]])",
        "arena_conversations(path [, on_error [, max_skipped]])",
        "pandalm(path [, on_error [, max_skipped]])",
        "hh_rlhf(path, seed [, on_error [, max_skipped]])",
    ] {
        let name = usage.split('(').next().unwrap_or(usage);
        ctx.register_udtf(name, Arc::new(SourceFunction { usage }));
    }
}

/// One source file as a stream of canonical rows (one partition of DataFusion's
/// `StreamingTable`, which projects the columns a query reads). Rows left out under the skip
/// policy are counted in the run's [`RunInputs`].
#[derive(Debug)]
struct SourceFile {
    kind: SourceKind,
    location: String,
    on_error: OnError,
    /// The share of a file's rows that `skip` may leave out before the query fails.
    max_skipped: f64,
    schema: SchemaRef,
}

/// Under `skip`, at most this share of a file's rows may be left out.
pub const DEFAULT_MAX_SKIPPED: f64 = 0.01;

impl PartitionStream for SourceFile {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, context: Arc<TaskContext>) -> SendableRecordBatchStream {
        let (kind, location, on_error) = (self.kind.clone(), self.location.clone(), self.on_error);
        let max_skipped = self.max_skipped;
        let batches = async move {
            if location.is_empty() {
                return Ok::<_, datafusion::error::DataFusionError>(stream::iter(Vec::new()));
            }
            let (batches, skipped) = read_source(&context, &kind, &location, on_error).await?;
            let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
            let total = rows + skipped.len();
            if total == 0 {
                return exec_err!("{location}: the file has no data rows");
            }
            if skipped.len() as f64 > max_skipped * total as f64 {
                return exec_err!(
                    "{location}: {} of {total} rows do not parse, over max_skipped = {max_skipped} of the rows (on_error = 'skip'); the first: {}",
                    skipped.len(),
                    skipped[0]
                );
            }
            if !skipped.is_empty() {
                tracing::warn!(
                    "{location}: skipped {} bad rows (on_error = 'skip'); first: {}",
                    skipped.len(),
                    skipped[0]
                );
            }
            if let Some(inputs) = context.session_config().get_extension::<RunInputs>() {
                inputs.record_skipped(&location, skipped.len());
            }
            Ok(stream::iter(
                batches.into_iter().map(Ok).collect::<Vec<_>>(),
            ))
        };
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            stream::once(batches).try_flatten().boxed(),
        ))
    }
}
