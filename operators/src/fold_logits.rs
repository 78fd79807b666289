//! `fold_logits(location, k)`: the logits of all `k` folds of one model as one table, with
//! the fold each row came from: `fold`, `id`, `order`, `logits` (3 x f32, as teacher_forward writes them), `label`,
//! `source`, `split` (`train`: the fold's distillation targets; `valid`: its held-out,
//! out-of-fold predictions). `location` is teacher_logits.sql's output folder with
//! `{fold}` where the fold number goes, e.g. `runs/r/teacher/gemma/fold{fold}/`; its
//! `shard=`/`split=` subfolders are read as columns. A fold without logits fails the
//! query naming its folder: out-of-fold figures over some of the folds would look
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

const USAGE: &str = "fold_logits(location, k)";

/// The columns, in order, with their types.
fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("fold", DataType::Int32, false),
        Field::new("id", DataType::Utf8, false),
        Field::new("order", DataType::Utf8, false),
        Field::new("logits", teacher_logits_type(), true),
        Field::new("label", DataType::Int8, true),
        Field::new("source", DataType::Utf8, true),
        Field::new("split", DataType::Utf8, false),
    ]))
}

/// The table function.
#[derive(Debug)]
pub struct FoldLogitsFunction;

impl TableFunctionImpl for FoldLogitsFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let args = Args::new(USAGE, &args)?;
        let location = args.required_string(0, "location")?;
        let Some(k) = args.integer(1, "k", 1)? else {
            return plan_err!("{USAGE}: k (the number of folds) is required");
        };
        if !location.contains("{fold}") {
            return plan_err!(
                "{USAGE}: location {location} has no {{fold}} where the fold number goes"
            );
        }
        let folders: Vec<String> = (0..k)
            .map(|fold| location.replace("{fold}", &fold.to_string()))
            .collect();
        for folder in &folders {
            args.record_input(folder);
        }
        Ok(Arc::new(FoldLogits { folders }))
    }
}

#[derive(Debug)]
struct FoldLogits {
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
impl TableProvider for FoldLogits {
    fn schema(&self) -> SchemaRef {
        schema()
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
        let schema = schema();
        let mut plan: Option<LogicalPlanBuilder> = None;
        for (fold, folder) in self.folders.iter().enumerate() {
            let table = parquet_folder(
                state,
                folder,
                &["id", "order", "logits", "label", "split"],
                ("fold_logits", &format!("fold {fold}'s logits")),
            )
            .await?;
            let has_source = table.schema().field_with_name("source").is_ok();
            let alias = format!("fold{fold}");
            let column = |name: &str| Expr::Column(Column::new(Some(alias.as_str()), name));
            let mut outputs = Vec::new();
            for field in schema.fields() {
                let expr = match field.name().as_str() {
                    "fold" => lit(fold as i32),
                    "source" if !has_source => lit(datafusion::scalar::ScalarValue::Utf8(None)),
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
            return plan_err!("{USAGE}: no folds");
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
