//! The `tokenize` operator: streams record batches of comparisons in and the same batches
//! with `input_ids` (list<int32>), `n_tokens` (int32) and `truncated` (boolean) out, each
//! batch encoded on all cores, partition by partition. The SQL table function
//! `tokenize(table, tokenizer, template, max_length [, truncation [, order [,
//! prompt_cap]]])` puts it into a plan.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int32Array, ListArray, RecordBatch, StringArray,
};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{plan_err, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::metrics::{BaselineMetrics, MetricBuilder};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use rayon::prelude::*;

use super::{Encoder, Order, Template, TextTokenizer, Truncation};
use crate::args::Args;
use crate::error::OperatorError;
use crate::scaffold::{Operator, OperatorExec, OperatorRun, OperatorTable};
pub use crate::token_rows::INPUT_IDS;

/// The columns the operator reads and adds.
pub const TEXT_COLUMNS: [&str; 3] = ["prompt", "response_a", "response_b"];
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

/// The tokenize operator: one encoder (tokenizer, template, truncation, order).
pub struct Tokenize {
    pub encoder: Arc<Encoder>,
}

impl fmt::Debug for Tokenize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.encoder)
    }
}

/// The plan node of `tokenize`.
pub type TokenizeExec = OperatorExec<Tokenize>;

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

impl Operator for Tokenize {
    const NAME: &'static str = "TokenizeExec";

    fn output_schema(&self, input: &Schema) -> Result<SchemaRef> {
        output_schema(input)
    }

    fn single_partition(&self) -> bool {
        false
    }

    fn execute(&self, run: OperatorRun) -> Result<SendableRecordBatchStream> {
        let baseline = BaselineMetrics::new(&run.metrics, run.partition);
        let tokens = MetricBuilder::new(&run.metrics).counter("tokens", run.partition);
        let (encoder, schema) = (self.encoder.clone(), run.schema.clone());
        let stream = run.input.then(move |batch| {
            let (encoder, schema) = (encoder.clone(), schema.clone());
            let (baseline, tokens) = (baseline.clone(), tokens.clone());
            async move {
                let batch = batch?;
                let compute = baseline.elapsed_compute().clone();
                let out = tokio::task::spawn_blocking(move || {
                    let _timer = compute.timer();
                    tokenize_batch(&encoder, &batch, &schema)
                })
                .await
                .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))??;
                let ids = out
                    .column_by_name(INPUT_IDS)
                    .map_or(0, |c| c.as_list::<i32>().values().len());
                tokens.add(ids);
                baseline.record_output(out.num_rows());
                Ok(out)
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(run.schema, stream)))
    }
}

const USAGE: &str =
    "tokenize(table, tokenizer, template, max_length [, truncation [, order [, prompt_cap]]])";

/// `tokenize(table, tokenizer, template, max_length [, truncation [, order [, prompt_cap]]])`.
#[derive(Debug)]
pub struct TokenizeFunction;

impl TableFunctionImpl for TokenizeFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let args = Args::new(USAGE, &args)?;
        let tokenizer = args.required_string(1, "tokenizer")?;
        let template = args.required_string(2, "template")?;
        let Some(max_length) = args.count(3, "max_length")? else {
            return plan_err!("{USAGE}: max_length is required");
        };
        let truncation = match args.string(4, "truncation")? {
            Some(name) => Truncation::parse(&name).map_err(external)?,
            None => Truncation::Balanced,
        };
        let order = match args.string(5, "order")? {
            Some(name) => Order::parse(&name).map_err(external)?,
            None => Order::Ab,
        };
        let prompt_cap = args.count(6, "prompt_cap")?.unwrap_or(256);
        args.record_input(&tokenizer);
        if std::path::Path::new(&template).is_file() {
            args.record_input(&template);
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
        let input = args.table(0)?;
        Ok(Arc::new(OperatorTable::try_new(
            Tokenize {
                encoder: Arc::new(encoder),
            },
            input,
        )?))
    }
}
