//! `with_teacher_logits(table, teachers, location)`: the rows of `table` with one more
//! column per teacher, named after it, holding that teacher's logits (3 x f32) for the
//! row's (id, order), or null where the teacher has none. `teachers` is a comma-separated
//! list of names; `location` is a folder of Parquet files (teacher_logits.sql's output, its
//! `shard=`/`split=` subfolders included) with `{teacher}` where the name goes, e.g.
//! `runs/r/teacher/{teacher}/fold0/`. Each folder is a left join on (id, order): the
//! distillation step then fails on a training row whose logits are missing, naming the
//! row and the teacher. Any number of teachers, in the order given.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{plan_err, Column, JoinType, Result};
use datafusion::datasource::{provider_as_source, TableType};
use datafusion::logical_expr::{cast, Expr, LogicalPlanBuilder};
use datafusion::physical_plan::ExecutionPlan;

use super::logits_type;
use crate::args::Args;
use crate::token_rows::{ID, ORDER};

const USAGE: &str = "with_teacher_logits(table, teachers, location)";
const LOGITS: &str = "logits";
const INPUT: &str = "rows";

/// The table function.
#[derive(Debug)]
pub struct WithTeacherLogitsFunction;

impl TableFunctionImpl for WithTeacherLogitsFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let args = Args::new(USAGE, &args)?;
        let input = args.table(0)?;
        let names: Vec<String> = args
            .required_string(1, "teachers")?
            .split(',')
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        let location = args.required_string(2, "location")?;
        if names.is_empty() {
            return plan_err!("{USAGE}: teachers names no teacher");
        }
        if !location.contains("{teacher}") {
            return plan_err!(
                "{USAGE}: location {location} has no {{teacher}} where the teacher's name goes"
            );
        }
        let schema = input.schema();
        for column in [ID, ORDER] {
            if schema.field_with_name(column).is_err() {
                return plan_err!("{USAGE}: the input has no column {column}");
            }
        }
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        let mut teachers = Vec::new();
        for name in names {
            if fields.iter().any(|f| f.name() == &name) {
                return plan_err!(
                    "{USAGE}: teacher {name} is named like a column of the input or another teacher"
                );
            }
            let folder = location.replace("{teacher}", &name);
            args.record_input(&folder);
            fields.push(Field::new(&name, logits_type(), true));
            teachers.push((name, folder));
        }
        Ok(Arc::new(WithTeacherLogits {
            input,
            teachers,
            schema: Arc::new(Schema::new(fields)),
        }))
    }
}

/// The view: the input left-joined with each teacher's logits folder.
#[derive(Debug)]
struct WithTeacherLogits {
    input: Arc<dyn TableProvider>,
    /// (name, folder) per teacher.
    teachers: Vec<(String, String)>,
    schema: SchemaRef,
}

#[async_trait]
impl TableProvider for WithTeacherLogits {
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
        let mut plan =
            LogicalPlanBuilder::scan(INPUT, provider_as_source(self.input.clone()), None)?;
        let mut outputs: Vec<Expr> = self
            .input
            .schema()
            .fields()
            .iter()
            .map(|f| Expr::Column(Column::new(Some(INPUT), f.name())))
            .collect();
        for (k, (name, folder)) in self.teachers.iter().enumerate() {
            let alias = format!("teacher{k}");
            let table = crate::fold_tables::parquet_folder(
                state,
                folder,
                &[ID, ORDER, LOGITS],
                ("with_teacher_logits", "the logits"),
            )
            .await?;
            let logits =
                LogicalPlanBuilder::scan(&alias, provider_as_source(Arc::new(table)), None)?
                    .build()?;
            let key = |q: &str| vec![Column::new(Some(q), ID), Column::new(Some(q), ORDER)];
            plan = plan.join(logits, JoinType::Left, (key(INPUT), key(&alias)), None)?;
            outputs.push(
                cast(
                    Expr::Column(Column::new(Some(alias.as_str()), LOGITS)),
                    logits_type(),
                )
                .alias(name),
            );
        }
        debug_assert_eq!(outputs.len(), self.schema.fields().len());
        let outputs = match projection {
            Some(columns) => columns.iter().map(|&i| outputs[i].clone()).collect(),
            None => outputs,
        };
        let plan = plan.project(outputs)?.build()?;
        state.create_physical_plan(&plan).await
    }
}
