//! Two file formats that `COPY ... TO` writes reports in, so that a report's pictures and
//! text come out of the plan's own queries (and a managed COPY records them like any
//! output):
//!
//! - `STORED AS PNG` (or a `.png` target) draws the query's rows as a chart, `OPTIONS
//!   ('chart' 'line' | 'reliability', 'title' '...', 'x_label' '...', 'y_label' '...',
//!   'bins' '10')`. `line`: columns `series`, `x`, `y`, one curve per series in the order
//!   series first appear, points in row order; with a column `colour`, series of one
//!   value share a colour. `reliability`: columns `series` (the class),
//!   `bin` (0-based), `x` (mean predicted probability in the bin), `y` (observed frequency),
//!   `rows` (the bin's row count), drawn as [`charts::reliability_diagram`].
//! - `STORED AS MD` (or a `.md` target) writes one text column, each row a line.
//!
//! Both write one file (the target must not end in `/`), only once the whole query has
//! run. Neither is read back: a table over these files is an error.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, SchemaRef, UInt64Type};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::Session;
use datafusion::common::{exec_err, not_impl_err, plan_err, GetExt, Result, Statistics};
use datafusion::datasource::file_format::file_compression_type::FileCompressionType;
use datafusion::datasource::file_format::{FileFormat, FileFormatFactory};
use datafusion::datasource::physical_plan::{
    FileScanConfig, FileSinkConfig, FileSource, JsonSource,
};
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::datasource::table_schema::TableSchema;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use datafusion::physical_expr::LexRequirement;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan};
use futures::TryStreamExt;

use crate::charts::{self, Labels, ReliabilityBin, ReliabilityCurve, Series};

/// What a report file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// A chart, as PNG.
    Png,
    /// Lines of text (Markdown).
    Markdown,
}

impl ReportKind {
    fn ext(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Markdown => "md",
        }
    }

    /// The options a COPY may give (without the `format.` prefix).
    fn options(self) -> &'static [&'static str] {
        match self {
            Self::Png => &["chart", "title", "x_label", "y_label", "bins"],
            Self::Markdown => &[],
        }
    }
}

/// The chart a PNG COPY draws.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartSpec {
    pub chart: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub bins: usize,
}

impl Default for ChartSpec {
    fn default() -> Self {
        Self {
            chart: "line".into(),
            title: String::new(),
            x_label: "x".into(),
            y_label: "y".into(),
            bins: 10,
        }
    }
}

/// Registers `STORED AS PNG` and `STORED AS MD`.
#[derive(Debug)]
pub struct ReportFormatFactory(pub ReportKind);

impl GetExt for ReportFormatFactory {
    fn get_ext(&self) -> String {
        self.0.ext().into()
    }
}

impl FileFormatFactory for ReportFormatFactory {
    fn create(
        &self,
        _state: &dyn Session,
        format_options: &HashMap<String, String>,
    ) -> Result<Arc<dyn FileFormat>> {
        let kind = self.0;
        let mut spec = ChartSpec::default();
        for (key, value) in format_options {
            let name = key.strip_prefix("format.").unwrap_or(key);
            if !kind.options().contains(&name) {
                return plan_err!(
                    "COPY ... STORED AS {}: unknown option {key:?}; the options are {:?}",
                    kind.ext().to_uppercase(),
                    kind.options()
                );
            }
            match name {
                "chart" if value == "line" || value == "reliability" => spec.chart = value.clone(),
                "chart" => {
                    return plan_err!(
                        "COPY ... STORED AS PNG: chart {value:?}; expected line or reliability"
                    )
                }
                "title" => spec.title = value.clone(),
                "x_label" => spec.x_label = value.clone(),
                "y_label" => spec.y_label = value.clone(),
                _ => match value.parse::<usize>() {
                    Ok(n @ 1..=1000) => spec.bins = n,
                    _ => {
                        return plan_err!(
                            "COPY ... STORED AS PNG: bins {value:?}; expected 1 to 1000"
                        )
                    }
                },
            }
        }
        Ok(Arc::new(ReportFormat { kind, spec }))
    }

    fn default(&self) -> Arc<dyn FileFormat> {
        Arc::new(ReportFormat {
            kind: self.0,
            spec: ChartSpec::default(),
        })
    }
}

#[derive(Debug)]
struct ReportFormat {
    kind: ReportKind,
    spec: ChartSpec,
}

impl ReportFormat {
    fn unreadable<T>(&self) -> Result<T> {
        not_impl_err!(
            "{} report files are written by COPY, not read as tables",
            self.kind.ext()
        )
    }
}

#[async_trait]
impl FileFormat for ReportFormat {
    fn get_ext(&self) -> String {
        self.kind.ext().into()
    }

    fn get_ext_with_compression(&self, _compression: &FileCompressionType) -> Result<String> {
        Ok(self.get_ext())
    }

    fn compression_type(&self) -> Option<FileCompressionType> {
        None
    }

    async fn infer_schema(
        &self,
        _state: &dyn Session,
        _store: &Arc<dyn ObjectStore>,
        _objects: &[ObjectMeta],
    ) -> Result<SchemaRef> {
        self.unreadable()
    }

    async fn infer_stats(
        &self,
        _state: &dyn Session,
        _store: &Arc<dyn ObjectStore>,
        _table_schema: SchemaRef,
        _object: &ObjectMeta,
    ) -> Result<Statistics> {
        self.unreadable()
    }

    async fn create_physical_plan(
        &self,
        _state: &dyn Session,
        _conf: FileScanConfig,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.unreadable()
    }

    async fn create_writer_physical_plan(
        &self,
        input: Arc<dyn ExecutionPlan>,
        _state: &dyn Session,
        conf: FileSinkConfig,
        order_requirements: Option<LexRequirement>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if !conf.table_partition_cols.is_empty() {
            return plan_err!(
                "COPY ... STORED AS {}: writes one file; PARTITIONED BY is not supported",
                self.kind.ext().to_uppercase()
            );
        }
        if conf.original_url.ends_with('/') {
            return plan_err!(
                "COPY ... STORED AS {}: {} is a folder; give the file's name",
                self.kind.ext().to_uppercase(),
                conf.original_url
            );
        }
        let sink = ReportSink {
            kind: self.kind,
            spec: self.spec.clone(),
            config: conf,
        };
        Ok(Arc::new(DataSinkExec::new(
            input,
            Arc::new(sink),
            order_requirements,
        )))
    }

    /// Never scanned (`create_physical_plan` refuses first); a file source is part of the
    /// trait.
    fn file_source(&self, table_schema: TableSchema) -> Arc<dyn FileSource> {
        Arc::new(JsonSource::new(table_schema))
    }
}

#[derive(Debug)]
struct ReportSink {
    kind: ReportKind,
    spec: ChartSpec,
    config: FileSinkConfig,
}

impl DisplayAs for ReportSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ReportSink({}) -> {}",
            self.kind.ext(),
            self.config.original_url
        )
    }
}

#[async_trait]
impl DataSink for ReportSink {
    fn schema(&self) -> &SchemaRef {
        self.config.output_schema()
    }

    async fn write_all(
        &self,
        data: SendableRecordBatchStream,
        context: &Arc<TaskContext>,
    ) -> Result<u64> {
        let batches: Vec<RecordBatch> = data.try_collect().await?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        let target = &self.config.original_url;
        let bytes = match self.kind {
            ReportKind::Markdown => markdown(target, &batches)?,
            ReportKind::Png => chart(target, &self.spec, &batches)?,
        };
        let store = context
            .runtime_env()
            .object_store(&self.config.object_store_url)?;
        let Some(url) = self.config.table_paths.first() else {
            return exec_err!("{target}: no path to write to");
        };
        store.put(url.prefix(), bytes.into()).await?;
        Ok(rows as u64)
    }
}

/// A column of `batch` by name, cast to `to`; the error names the target and the column.
fn column(target: &str, batch: &RecordBatch, name: &str, to: &DataType) -> Result<ArrayRef> {
    let Ok(index) = batch.schema().index_of(name) else {
        let have: Vec<String> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        return exec_err!("{target}: the query has no column {name} (it has {have:?})");
    };
    Ok(cast(batch.column(index), to)?)
}

/// The rows of one text column, each followed by a newline.
fn markdown(target: &str, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut text = String::new();
    for batch in batches {
        if batch.num_columns() != 1 {
            return exec_err!(
                "{target}: a Markdown file is written from one text column, the query has {}",
                batch.num_columns()
            );
        }
        let lines = cast(batch.column(0), &DataType::Utf8)?;
        for line in lines.as_string::<i32>() {
            text.push_str(line.unwrap_or(""));
            text.push('\n');
        }
    }
    Ok(text.into_bytes())
}

/// A chart's rows, read column by column; `row` counts over the whole query for errors.
struct ChartRows<'a> {
    target: &'a str,
    row: usize,
}

impl ChartRows<'_> {
    fn value(&self, name: &str, values: &ArrayRef, i: usize) -> Result<f64> {
        let values = values.as_primitive::<Float64Type>();
        if values.is_null(i) || !values.value(i).is_finite() {
            return exec_err!(
                "{}: row {}: {name} is {}; a chart needs a finite number",
                self.target,
                self.row + i + 1,
                if values.is_null(i) {
                    "null".to_string()
                } else {
                    values.value(i).to_string()
                }
            );
        }
        Ok(values.value(i))
    }
}

/// Adds `point` to the series named `name`, creating it at the end if new.
fn push_point<T: Default>(series: &mut Vec<(String, T)>, name: &str, add: impl FnOnce(&mut T)) {
    match series.iter_mut().find(|(n, _)| n == name) {
        Some((_, s)) => add(s),
        None => {
            let mut s = T::default();
            add(&mut s);
            series.push((name.to_string(), s));
        }
    }
}

fn chart(target: &str, spec: &ChartSpec, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut rows = ChartRows { target, row: 0 };
    let f64 = DataType::Float64;
    let reliability = spec.chart == "reliability";
    let mut lines: Vec<(String, Series)> = Vec::new();
    let mut curves: Vec<(String, Vec<ReliabilityBin>)> = Vec::new();
    for batch in batches {
        let series = column(target, batch, "series", &DataType::Utf8)?;
        let series = series.as_string::<i32>();
        let x = column(target, batch, "x", &f64)?;
        let y = column(target, batch, "y", &f64)?;
        let extra = if reliability {
            Some((
                column(target, batch, "bin", &DataType::UInt64)?,
                column(target, batch, "rows", &DataType::UInt64)?,
            ))
        } else {
            None
        };
        let colours = match batch.schema().index_of("colour") {
            Ok(_) if !reliability => Some(column(target, batch, "colour", &DataType::Utf8)?),
            _ => None,
        };
        for i in 0..batch.num_rows() {
            let name = if series.is_null(i) {
                ""
            } else {
                series.value(i)
            };
            let point = (rows.value("x", &x, i)?, rows.value("y", &y, i)?);
            match &extra {
                None => {
                    let key = colours.as_ref().and_then(|c| {
                        let c = c.as_string::<i32>();
                        (!c.is_null(i)).then(|| c.value(i).to_string())
                    });
                    push_point(&mut lines, name, |s: &mut Series| {
                        s.points.push(point);
                        if s.colour.is_none() {
                            s.colour = key;
                        }
                    })
                }
                Some((bin, count)) => {
                    let (bin, count) = (
                        bin.as_primitive::<UInt64Type>(),
                        count.as_primitive::<UInt64Type>(),
                    );
                    if bin.is_null(i) || count.is_null(i) || bin.value(i) as usize >= spec.bins {
                        return exec_err!(
                            "{target}: row {}: bin {:?} with rows {:?}; expected a bin in 0..{} and a row count",
                            rows.row + i + 1,
                            (!bin.is_null(i)).then(|| bin.value(i)),
                            (!count.is_null(i)).then(|| count.value(i)),
                            spec.bins
                        );
                    }
                    let entry = ReliabilityBin {
                        bin: bin.value(i) as usize,
                        predicted: point.0,
                        observed: point.1,
                        rows: count.value(i),
                    };
                    push_point(&mut curves, name, |s| s.push(entry));
                }
            }
        }
        rows.row += batch.num_rows();
    }
    let labels = Labels {
        title: &spec.title,
        x: &spec.x_label,
        y: &spec.y_label,
    };
    let drawn = if reliability {
        let curves: Vec<ReliabilityCurve> = curves
            .into_iter()
            .map(|(class, bins)| ReliabilityCurve { class, bins })
            .collect();
        charts::reliability_diagram(&spec.title, spec.bins, &curves)
    } else {
        let series: Vec<Series> = lines
            .into_iter()
            .map(|(name, s)| Series { name, ..s })
            .collect();
        charts::line_chart(labels, &series)
    };
    drawn.map_err(|e| datafusion::error::DataFusionError::Execution(format!("{target}: {e}")))
}
