//! `markdown_row(v1, v2, ...)`: one row of a Markdown table, `| v1 | v2 | ... |`, for
//! reports written by `COPY ... STORED AS MD`. Floating-point values print with
//! `digits` decimals (4; `markdown_row` has no argument for it, so every report's numbers
//! read alike), other values as text; `|` in text is escaped and a line break becomes a
//! space, so that a value stays in its cell; null is an empty cell.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringBuilder};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type};
use datafusion::common::{plan_err, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

/// Decimals of a floating-point cell.
pub const DIGITS: usize = 4;

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct MarkdownRow {
    signature: Signature,
}

impl Default for MarkdownRow {
    fn default() -> Self {
        Self {
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

/// One cell's text.
fn cell(column: &ArrayRef, row: usize) -> String {
    if column.is_null(row) {
        return String::new();
    }
    match column.data_type() {
        DataType::Float64 => format!(
            "{:.DIGITS$}",
            column.as_primitive::<Float64Type>().value(row)
        ),
        _ => column
            .as_string::<i32>()
            .value(row)
            .replace('|', "\\|")
            .replace(['\n', '\r'], " "),
    }
}

impl ScalarUDFImpl for MarkdownRow {
    fn name(&self) -> &str {
        "markdown_row"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        if arg_types.is_empty() {
            return plan_err!("markdown_row takes one value per cell, got none");
        }
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let columns = args
            .args
            .iter()
            .map(|a| {
                let column = a.to_array(n)?;
                let to = match column.data_type() {
                    DataType::Float16 | DataType::Float32 | DataType::Float64 => DataType::Float64,
                    DataType::Decimal32(..)
                    | DataType::Decimal64(..)
                    | DataType::Decimal128(..)
                    | DataType::Decimal256(..) => DataType::Float64,
                    _ => DataType::Utf8,
                };
                Ok(cast(&column, &to)?)
            })
            .collect::<Result<Vec<ArrayRef>>>()?;
        let mut rows = StringBuilder::with_capacity(n, n * 16 * columns.len());
        for row in 0..n {
            let cells: Vec<String> = columns.iter().map(|c| cell(c, row)).collect();
            rows.append_value(format!("| {} |", cells.join(" | ")));
        }
        Ok(ColumnarValue::Array(Arc::new(rows.finish())))
    }
}
