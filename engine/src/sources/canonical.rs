//! The canonical comparison table every source is read into.

use std::sync::{Arc, LazyLock};

use arenaflow_udfs::{append_turns, turns_type};
use datafusion::arrow::array::{ArrayRef, Int8Builder, ListBuilder, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::Result;

pub type Turns = Vec<Option<String>>;

/// One comparison: a prompt, two responses, and who won (A = 0, B = 1, tie = 2).
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub id: String,
    pub prompt: Turns,
    pub response_a: Turns,
    pub response_b: Turns,
    pub model_a: Option<String>,
    pub model_b: Option<String>,
    pub label: Option<i8>,
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("prompt", turns_type(), true),
        Field::new("response_a", turns_type(), true),
        Field::new("response_b", turns_type(), true),
        Field::new("model_a", DataType::Utf8, true),
        Field::new("model_b", DataType::Utf8, true),
        Field::new("label", DataType::Int8, true),
    ]))
});

/// `(id, source, prompt, response_a, response_b, model_a, model_b, label)`.
pub fn canonical_schema() -> SchemaRef {
    SCHEMA.clone()
}

/// Rows per record batch that readers emit.
pub const BATCH_ROWS: usize = 8192;

/// Builds canonical record batches.
pub fn comparisons_to_batch(source: &str, rows: &[Comparison]) -> Result<RecordBatch> {
    let mut id = StringBuilder::new();
    let mut src = StringBuilder::new();
    let mut turn_columns = [(); 3].map(|_| ListBuilder::new(StringBuilder::new()));
    let mut model_a = StringBuilder::new();
    let mut model_b = StringBuilder::new();
    let mut label = Int8Builder::new();
    for row in rows {
        id.append_value(&row.id);
        src.append_value(source);
        append_turns(&mut turn_columns[0], &row.prompt);
        append_turns(&mut turn_columns[1], &row.response_a);
        append_turns(&mut turn_columns[2], &row.response_b);
        model_a.append_option(row.model_a.as_deref());
        model_b.append_option(row.model_b.as_deref());
        label.append_option(row.label);
    }
    let [mut prompt, mut response_a, mut response_b] = turn_columns;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(src.finish()),
        Arc::new(prompt.finish()),
        Arc::new(response_a.finish()),
        Arc::new(response_b.finish()),
        Arc::new(model_a.finish()),
        Arc::new(model_b.finish()),
        Arc::new(label.finish()),
    ];
    Ok(RecordBatch::try_new(canonical_schema(), columns)?)
}
