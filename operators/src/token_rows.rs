//! The token path every model operator shares: the column names of tokenized rows, the
//! Arrow -> token-rows reader with its checks (keys, vocabulary), and batching by a token
//! budget.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Int32Type};
use datafusion::common::{DataFusionError, Result};

use crate::error::OperatorError;

/// A comparison's id (string or integer).
pub const ID: &str = "id";
/// Which order the responses are in: `ab` or `ba` (swapped).
pub const ORDER: &str = "order";
/// The tokenized row (list<int32>, unpadded).
pub const INPUT_IDS: &str = "input_ids";
/// A model's 3 logits (A, B, tie), not probabilities.
pub const LOGITS: &str = "logits";

/// The key of a tokenized row: (id, order).
pub type RowKey = (String, String);

/// An input error of `operator`, at the SQL boundary.
pub fn input_error(operator: &str, message: String) -> DataFusionError {
    DataFusionError::External(Box::new(OperatorError::Input(format!(
        "{operator}: {message}"
    ))))
}

/// The (id, order) of every row of `batch`; a null id or an order other than `ab` / `ba`
/// is an error naming the row.
pub fn row_keys(operator: &str, batch: &RecordBatch) -> Result<Vec<RowKey>> {
    let column = |name: &str| -> Result<ArrayRef> {
        let c = batch
            .column_by_name(name)
            .ok_or_else(|| input_error(operator, format!("no column {name}")))?;
        Ok(cast(c, &DataType::Utf8)?)
    };
    let (ids, orders) = (column(ID)?, column(ORDER)?);
    let (ids, orders) = (ids.as_string::<i32>(), orders.as_string::<i32>());
    (0..batch.num_rows())
        .map(|r| {
            if ids.is_null(r) {
                return Err(input_error(
                    operator,
                    format!("a row has a null id (batch row {r})"),
                ));
            }
            let order = if orders.is_null(r) {
                ""
            } else {
                orders.value(r)
            };
            if order != "ab" && order != "ba" {
                return Err(input_error(
                    operator,
                    format!(
                        "id {}, column order: {order:?} is not 'ab' or 'ba'",
                        ids.value(r)
                    ),
                ));
            }
            Ok((ids.value(r).to_string(), order.to_string()))
        })
        .collect()
}

/// Every row's token ids, checked: not null, not empty, every id inside the vocabulary.
/// Errors name the input row (counting from 1 over the whole input: `first_row` rows came
/// before this batch), its key and the column.
pub fn token_rows(
    operator: &str,
    batch: &RecordBatch,
    first_row: usize,
    keys: &[RowKey],
    vocab_size: usize,
) -> Result<Vec<Vec<u32>>> {
    let column = batch
        .column_by_name(INPUT_IDS)
        .ok_or_else(|| input_error(operator, format!("no column {INPUT_IDS}")))?;
    let list_type = DataType::List(Arc::new(Field::new_list_field(DataType::Int32, true)));
    let lists = cast(column, &list_type)?;
    let lists = lists.as_list::<i32>();
    let mut rows = Vec::with_capacity(batch.num_rows());
    for (r, (id, order)) in keys.iter().enumerate() {
        let at = |m: String| {
            input_error(
                operator,
                format!(
                    "input row {} (id {id}, order {order}), column {INPUT_IDS}: {m}",
                    first_row + r + 1
                ),
            )
        };
        if lists.is_null(r) {
            return Err(at("null".into()));
        }
        let values = lists.value(r);
        let values = values.as_primitive::<Int32Type>();
        if values.is_empty() {
            return Err(at("no tokens".into()));
        }
        let mut tokens = Vec::with_capacity(values.len());
        for (i, v) in values.iter().enumerate() {
            match v {
                Some(t) if t >= 0 && (t as usize) < vocab_size => tokens.push(t as u32),
                Some(t) => {
                    return Err(at(format!(
                        "token {t} at position {i} is outside the vocabulary (0..{vocab_size})"
                    )))
                }
                None => return Err(at(format!("null token at position {i}"))),
            }
        }
        rows.push(tokens);
    }
    Ok(rows)
}

/// Splits rows into forward batches: longest first (an out-of-memory shows at once; rows of
/// one length keep their input order, so the batches depend on that order alone), each
/// batch as many rows as fit `max_batch_tokens` once padded to its longest row (at least
/// one). Without a pad token every row is its own batch, as transformers requires.
pub fn plan_batches(
    lengths: &[usize],
    max_batch_tokens: usize,
    one_row_each: bool,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut batches = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let longest = lengths[order[start]].max(1);
        let fit = if one_row_each {
            1
        } else {
            (max_batch_tokens / longest).max(1)
        };
        let end = (start + fit).min(order.len());
        batches.push(order[start..end].to_vec());
        start = end;
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_sorted_and_under_budget() {
        let lengths = [5, 100, 7, 60, 60, 3, 99];
        let batches = plan_batches(&lengths, 200, false);
        assert_eq!(batches, vec![vec![1, 6], vec![3, 4, 2], vec![0, 5]]);
        for b in &batches {
            let longest = b.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(b.len() == 1 || b.len() * longest <= 200);
        }
        let one = plan_batches(&lengths, 200, true);
        assert_eq!(one.len(), lengths.len());
        // A row longer than the budget still runs, alone.
        assert_eq!(plan_batches(&[500, 10], 100, false), vec![vec![0], vec![1]]);
    }
}
