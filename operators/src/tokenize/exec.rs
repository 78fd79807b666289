//! `TokenizeExec`: streams record batches of comparisons in and the same batches with
//! `input_ids` (list<int32>), `n_tokens` (int32) and `truncated` (boolean) out, each batch
//! encoded on all cores. The SQL table function `tokenize(table, tokenizer, template,
//! max_length [, truncation [, order [, prompt_cap]]])` puts it into a plan.

use std::fmt;
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int32Array, ListArray, RecordBatch, StringArray,
};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{plan_err, Result};
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use rayon::prelude::*;

use super::{Encoder, Order, Template, TextTokenizer, Truncation};
use crate::error::OperatorError;
use crate::sql::{count_arg, project, resolve_table, string_arg};

/// The columns the operator reads and adds.
pub const TEXT_COLUMNS: [&str; 3] = ["prompt", "response_a", "response_b"];
pub const INPUT_IDS: &str = "input_ids";
pub const N_TOKENS: &str = "n_tokens";
pub const TRUNCATED: &str = "truncated";

fn external(e: OperatorError) -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::External(Box::new(e))
}

/// The schema `input` gets with the three token columns.
pub fn output_schema(input: &Schema) -> Result<SchemaRef> {
    for name in TEXT_COLUMNS {
        match input.field_with_name(name) {
            Ok(f)
                if matches!(
                    f.data_type(),
                    DataType::List(_) | DataType::LargeList(_) | DataType::ListView(_)
                ) => {}
            Ok(f) => {
                return plan_err!(
                    "tokenize: column {name} is {}, not a list of turns",
                    f.data_type()
                )
            }
            Err(_) => {
                return plan_err!("tokenize: the input has no column {name} (a list of turns)")
            }
        }
    }
    for name in [INPUT_IDS, N_TOKENS, TRUNCATED] {
        if input.field_with_name(name).is_ok() {
            return plan_err!("tokenize: the input already has a column {name}");
        }
    }
    let mut fields: Vec<Arc<Field>> = input.fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new(
        INPUT_IDS,
        DataType::List(Arc::new(Field::new_list_field(DataType::Int32, false))),
        false,
    )));
    fields.push(Arc::new(Field::new(N_TOKENS, DataType::Int32, false)));
    fields.push(Arc::new(Field::new(TRUNCATED, DataType::Boolean, false)));
    Ok(Arc::new(Schema::new_with_metadata(
        fields,
        input.metadata().clone(),
    )))
}

/// Encodes one batch: every row on the rayon pool.
pub fn tokenize_batch(
    encoder: &Encoder,
    batch: &RecordBatch,
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let target = DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true)));
    let mut texts = Vec::with_capacity(3);
    for name in TEXT_COLUMNS {
        let column = batch
            .column_by_name(name)
            .expect("checked by output_schema");
        let column = datafusion::arrow::compute::cast(column, &target)?;
        texts.push(column);
    }
    let lists: Vec<&ListArray> = texts.iter().map(|c| c.as_list::<i32>()).collect();
    let values: Vec<&StringArray> = lists
        .iter()
        .map(|l| l.values().as_string::<i32>())
        .collect();
    let turns = |col: usize, row: usize| -> std::result::Result<Vec<&str>, String> {
        if lists[col].is_null(row) {
            return Err(format!(
                "row {row} of the batch, column {}: null",
                TEXT_COLUMNS[col]
            ));
        }
        let offsets = lists[col].value_offsets();
        let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
        Ok((start..end)
            .map(|i| {
                if values[col].is_null(i) {
                    ""
                } else {
                    values[col].value(i)
                }
            })
            .collect())
    };
    let encoded: Vec<std::result::Result<super::Encoded, String>> = (0..batch.num_rows())
        .into_par_iter()
        .map(|row| {
            let (p, a, b) = (turns(0, row)?, turns(1, row)?, turns(2, row)?);
            encoder
                .encode(&p, &a, &b)
                .map_err(|e| format!("row {row}: {e}"))
        })
        .collect();
    let mut offsets = Vec::with_capacity(batch.num_rows() + 1);
    offsets.push(0i32);
    let mut ids = Vec::new();
    let mut n_tokens = Vec::with_capacity(batch.num_rows());
    let mut truncated = Vec::with_capacity(batch.num_rows());
    for e in encoded {
        let e =
            e.map_err(|message| external(OperatorError::Input(format!("tokenize: {message}"))))?;
        ids.extend(e.input_ids.iter().map(|&t| t as i32));
        offsets.push(ids.len() as i32);
        n_tokens.push(e.input_ids.len() as i32);
        truncated.push(e.truncated);
    }
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    columns.push(Arc::new(ListArray::try_new(
        Arc::new(Field::new_list_field(DataType::Int32, false)),
        OffsetBuffer::new(offsets.into()),
        Arc::new(Int32Array::from(ids)),
        None,
    )?));
    columns.push(Arc::new(Int32Array::from(n_tokens)));
    columns.push(Arc::new(BooleanArray::from(truncated)));
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// The tokenize operator over one child plan.
#[derive(Debug)]
pub struct TokenizeExec {
    input: Arc<dyn ExecutionPlan>,
    encoder: Arc<Encoder>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Encoder(tokenizer={}, template={}, max_length={}, truncation={:?}, order={}, prompt_cap={})",
            self.tokenizer.path.display(),
            self.template.name,
            self.max_length,
            self.truncation,
            self.order.name(),
            self.prompt_cap
        )
    }
}

impl TokenizeExec {
    pub fn try_new(input: Arc<dyn ExecutionPlan>, encoder: Arc<Encoder>) -> Result<Self> {
        let schema = output_schema(&input.schema())?;
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            input.properties().output_partitioning().clone(),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(Self {
            input,
            encoder,
            schema,
            properties,
        })
    }
}

impl DisplayAs for TokenizeExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "TokenizeExec: {:?}", self.encoder)
    }
}

impl ExecutionPlan for TokenizeExec {
    fn name(&self) -> &str {
        "TokenizeExec"
    }
    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }
    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
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
        match children.as_slice() {
            [child] => Ok(Arc::new(Self::try_new(
                child.clone(),
                self.encoder.clone(),
            )?)),
            _ => plan_err!("TokenizeExec takes one child"),
        }
    }
    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let (encoder, schema) = (self.encoder.clone(), self.schema.clone());
        let stream = input.then(move |batch| {
            let (encoder, schema) = (encoder.clone(), schema.clone());
            async move {
                let batch = batch?;
                tokio::task::spawn_blocking(move || tokenize_batch(&encoder, &batch, &schema))
                    .await
                    .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            stream,
        )))
    }
}

/// `tokenize(table, tokenizer, template, max_length [, truncation [, order [, prompt_cap]]])`.
pub struct TokenizeFunction {
    state: Weak<parking_lot::RwLock<datafusion::execution::context::SessionState>>,
    on_input: InputHook,
}

impl fmt::Debug for TokenizeFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenizeFunction")
    }
}

const USAGE: &str =
    "tokenize(table, tokenizer, template, max_length [, truncation [, order [, prompt_cap]]])";

impl TableFunctionImpl for TokenizeFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let exprs = args.exprs();
        if !(4..=7).contains(&exprs.len()) {
            return plan_err!("{USAGE}: got {} arguments", exprs.len());
        }
        let table = string_arg("tokenize", "table", &exprs[0])?;
        let tokenizer = string_arg("tokenize", "tokenizer", &exprs[1])?;
        let template = string_arg("tokenize", "template", &exprs[2])?;
        let max_length = count_arg("tokenize", "max_length", &exprs[3])?;
        let truncation = match exprs.get(4) {
            Some(e) => {
                Truncation::parse(&string_arg("tokenize", "truncation", e)?).map_err(external)?
            }
            None => Truncation::Balanced,
        };
        let order = match exprs.get(5) {
            Some(e) => Order::parse(&string_arg("tokenize", "order", e)?).map_err(external)?,
            None => Order::Ab,
        };
        let prompt_cap = match exprs.get(6) {
            Some(e) => count_arg("tokenize", "prompt_cap", e)?,
            None => 256,
        };
        (self.on_input)(&tokenizer);
        if std::path::Path::new(&template).is_file() {
            (self.on_input)(&template);
        }
        let encoder = Encoder::new(
            Arc::new(TextTokenizer::open(std::path::Path::new(&tokenizer)).map_err(external)?),
            Template::open(&template).map_err(external)?,
            max_length,
            truncation,
            order,
            prompt_cap,
        )
        .map_err(external)?;
        let input = resolve_table("tokenize", &self.state, &table)?;
        let schema = output_schema(&input.schema())?;
        Ok(Arc::new(TokenizeTable {
            input,
            encoder: Arc::new(encoder),
            schema,
        }))
    }
}

#[derive(Debug)]
struct TokenizeTable {
    input: Arc<dyn TableProvider>,
    encoder: Arc<Encoder>,
    schema: SchemaRef,
}

#[async_trait]
impl TableProvider for TokenizeTable {
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
        let input = self.input.scan(state, None, &[], None).await?;
        project(
            Arc::new(TokenizeExec::try_new(input, self.encoder.clone())?),
            projection,
        )
    }
}

/// Registers `tokenize` on a session; `on_input` hears of every tokenizer and template file
/// it opens (for the run manifest's input hashes).
pub fn register(ctx: &SessionContext, on_input: InputHook) {
    ctx.register_udtf(
        "tokenize",
        Arc::new(TokenizeFunction {
            state: ctx.state_weak_ref(),
            on_input,
        }),
    );
}

/// Called with the path of every file an operator reads.
pub type InputHook = Arc<dyn Fn(&str) + Send + Sync>;
