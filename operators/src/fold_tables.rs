//! Tables over all `k` folds of one output, with the fold each row came from, for
//! figures that need every fold:
//!
//! - `fold_logits(location, k)`: the logits of one model: `fold`, `id`, `order`, `logits`
//!   (3 x f32, as teacher_forward writes them), `label`, `source`, `split` (`train`: the
//!   fold's distillation targets; `valid`: its held-out, out-of-fold predictions).
//!   `location` is teacher_logits.sql's output folder with `{fold}` where the fold number
//!   goes, e.g. `runs/r/teacher/gemma/fold{fold}/`.
//! - `fold_metrics(location, k)`: the training metrics of one model's fold runs
//!   (`distill_step`'s rows): `fold`, `kind` (`step` / `eval`), `step`, `epoch`, `loss`,
//!   `dev_log_loss`, `dev_accuracy`; `location` e.g. `runs/r/train/student/fold{fold}/`.
//!
//! `key=value` subfolders (`shard=`, `split=`) are read as columns. A fold without its
//! files fails the query naming its folder: figures over some of the folds would look
//! complete and be wrong.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{plan_err, Column, DataFusionError, Result};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::{provider_as_source, TableType};
use datafusion::logical_expr::{cast, lit, Expr, LogicalPlanBuilder};
use datafusion::physical_plan::ExecutionPlan;

use crate::args::Args;
use crate::teacher_forward::exec::teacher_logits_type;

/// What one fold table reads.
#[derive(Debug)]
pub struct FoldTableFunction {
    /// The SQL function's name.
    name: &'static str,
    /// Its usage line.
    usage: &'static str,
    /// The files' contents, as errors name them ("logits": "fold 2's logits").
    what: &'static str,
    /// The columns after `fold`; `true` where a fold's files may lack it (null then).
    columns: fn() -> Vec<(Field, bool)>,
}

/// `fold_logits(location, k)`.
pub const FOLD_LOGITS: FoldTableFunction = FoldTableFunction {
    name: "fold_logits",
    usage: "fold_logits(location, k)",
    what: "logits",
    columns: || {
        vec![
            (Field::new("id", DataType::Utf8, false), false),
            (Field::new("order", DataType::Utf8, false), false),
            (Field::new("logits", teacher_logits_type(), true), false),
            (Field::new("label", DataType::Int8, true), false),
            (Field::new("source", DataType::Utf8, true), true),
            (Field::new("split", DataType::Utf8, false), false),
        ]
    },
};

/// `fold_metrics(location, k)`.
pub const FOLD_METRICS: FoldTableFunction = FoldTableFunction {
    name: "fold_metrics",
    usage: "fold_metrics(location, k)",
    what: "training metrics",
    columns: || {
        let f = |name: &str| (Field::new(name, DataType::Float64, true), false);
        vec![
            (Field::new("kind", DataType::Utf8, false), false),
            (Field::new("step", DataType::UInt64, false), false),
            f("epoch"),
            f("loss"),
            f("dev_log_loss"),
            f("dev_accuracy"),
        ]
    },
};

impl FoldTableFunction {
    fn schema(&self) -> SchemaRef {
        let mut fields = vec![Field::new("fold", DataType::Int32, false)];
        fields.extend((self.columns)().into_iter().map(|(f, _)| f));
        Arc::new(Schema::new(fields))
    }
}

impl TableFunctionImpl for FoldTableFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let usage = self.usage;
        let args = Args::new(usage, &args)?;
        let location = args.required_string(0, "location")?;
        let Some(k) = args.integer(1, "k", 1)? else {
            return plan_err!("{usage}: k (the number of folds) is required");
        };
        if !location.contains("{fold}") {
            return plan_err!(
                "{usage}: location {location} has no {{fold}} where the fold number goes"
            );
        }
        let folders: Vec<String> = (0..k)
            .map(|fold| location.replace("{fold}", &fold.to_string()))
            .collect();
        for folder in &folders {
            args.record_input(folder);
        }
        Ok(Arc::new(FoldTable {
            function: self.name,
            what: self.what,
            schema: self.schema(),
            optional: (self.columns)()
                .into_iter()
                .filter(|(_, optional)| *optional)
                .map(|(f, _)| f.name().clone())
                .collect(),
            folders,
        }))
    }
}

#[derive(Debug)]
struct FoldTable {
    function: &'static str,
    what: &'static str,
    schema: SchemaRef,
    /// Columns a fold's files may lack.
    optional: Vec<String>,
    /// Fold j's folder at index j.
    folders: Vec<String>,
}

/// A folder of Parquet files as a table, its `key=value` subfolders (`shard=`, `split=`) as
/// text columns, checked to have `columns`; errors begin with `function` and name the
/// folder's contents `what` ("fold 2's logits").
pub(crate) async fn parquet_folder(
    state: &dyn Session,
    folder: &str,
    columns: &[&str],
    (function, what): (&str, &str),
) -> Result<ListingTable> {
    let unreadable = |e: DataFusionError| {
        DataFusionError::Plan(format!("{function}: cannot read {what} in {folder}: {e}"))
    };
    let url = ListingTableUrl::parse(folder)?;
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let partitions = options
        .infer_partitions(state, &url)
        .await
        .map_err(unreadable)?;
    let options = options.with_table_partition_cols(
        partitions
            .into_iter()
            .map(|name| (name, DataType::Utf8))
            .collect(),
    );
    let file_schema = options
        .infer_schema(state, &url)
        .await
        .map_err(unreadable)?;
    for column in columns {
        let partition = options
            .table_partition_cols
            .iter()
            .any(|(n, _)| n == column);
        if file_schema.field_with_name(column).is_err() && !partition {
            return plan_err!("{function}: {what} in {folder} have no column {column}");
        }
    }
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(file_schema);
    ListingTable::try_new(config)
}

#[async_trait]
impl TableProvider for FoldTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let schema = &self.schema;
        let required: Vec<&str> = schema
            .fields()
            .iter()
            .skip(1)
            .map(|f| f.name().as_str())
            .filter(|name| !self.optional.iter().any(|o| o == name))
            .collect();
        let mut plan: Option<LogicalPlanBuilder> = None;
        for (fold, folder) in self.folders.iter().enumerate() {
            let table = parquet_folder(
                state,
                folder,
                &required,
                (self.function, &format!("fold {fold}'s {}", self.what)),
            )
            .await?;
            let present = |name: &str| {
                table.schema().field_with_name(name).is_ok()
                    || !self.optional.iter().any(|o| o == name)
            };
            let alias = format!("fold{fold}");
            let column = |name: &str| Expr::Column(Column::new(Some(alias.as_str()), name));
            let mut outputs = Vec::new();
            for field in schema.fields() {
                let expr = match field.name().as_str() {
                    "fold" => lit(fold as i32),
                    name if !present(name) => lit(datafusion::scalar::ScalarValue::Null),
                    name => column(name),
                };
                outputs.push(cast(expr, field.data_type().clone()).alias(field.name()));
            }
            let one = LogicalPlanBuilder::scan(&alias, provider_as_source(Arc::new(table)), None)?
                .project(outputs)?;
            plan = Some(match plan {
                None => one,
                Some(all) => all.union(one.build()?)?,
            });
        }
        let Some(plan) = plan else {
            return plan_err!("{}: no folds", self.function);
        };
        let plan = match projection {
            Some(columns) => {
                let names: Vec<Expr> = columns
                    .iter()
                    .map(|&i| Expr::Column(Column::from_name(schema.field(i).name())))
                    .collect();
                plan.project(names)?
            }
            None => plan,
        };
        state.create_physical_plan(&plan.build()?).await
    }
}
