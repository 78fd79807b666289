//! Labels: A wins = 0, B wins = 1, tie = 2 (the order of the Kaggle one-hot columns).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int8Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::common::{exec_err, plan_err, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

pub const LABEL_A: i8 = 0;
pub const LABEL_B: i8 = 1;
pub const LABEL_TIE: i8 = 2;

/// The one-hot winner columns as a label; anything but exactly one 1 among 0s is an error.
pub fn one_hot_label(winner_a: i64, winner_b: i64, winner_tie: i64) -> Result<i8, String> {
    match (winner_a, winner_b, winner_tie) {
        (1, 0, 0) => Ok(LABEL_A),
        (0, 1, 0) => Ok(LABEL_B),
        (0, 0, 1) => Ok(LABEL_TIE),
        (a, b, t) => Err(format!(
            "winner_model_a, winner_model_b, winner_tie must be one-hot (exactly one 1, the others 0), got {a}, {b}, {t}"
        )),
    }
}

/// The label of the same comparison with A and B swapped.
pub fn swap(label: i8) -> i8 {
    match label {
        LABEL_A => LABEL_B,
        LABEL_B => LABEL_A,
        other => other,
    }
}

fn is_integer(t: &DataType) -> bool {
    t.is_integer() || matches!(t, DataType::Null)
}

/// `arena_label(winner_model_a, winner_model_b, winner_tie)`: one-hot columns to 0/1/2,
/// strict; all three null gives a null label (an unlabelled row).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ArenaLabel {
    signature: Signature,
}

impl Default for ArenaLabel {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for ArenaLabel {
    fn name(&self) -> &str {
        "arena_label"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        if arg_types.len() != 3 || !arg_types.iter().all(is_integer) {
            return plan_err!(
                "arena_label takes three integer one-hot columns (winner_model_a, winner_model_b, winner_tie), got {arg_types:?}"
            );
        }
        Ok(vec![DataType::Int64; 3])
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let columns = args
            .args
            .iter()
            .map(|a| Ok(cast(&a.to_array(args.number_rows)?, &DataType::Int64)?))
            .collect::<Result<Vec<ArrayRef>>>()?;
        let [a, b, t] = [0, 1, 2].map(|i| columns[i].as_primitive::<Int64Type>());
        let mut labels = Vec::with_capacity(args.number_rows);
        for row in 0..args.number_rows {
            let nulls = [a, b, t].iter().filter(|c| c.is_null(row)).count();
            labels.push(match nulls {
                3 => None,
                0 => match one_hot_label(a.value(row), b.value(row), t.value(row)) {
                    Ok(label) => Some(label),
                    Err(e) => return exec_err!("arena_label: row {row} of the batch: {e}"),
                },
                _ => return exec_err!("arena_label: row {row} of the batch: some winner columns are null and some are not"),
            });
        }
        Ok(ColumnarValue::Array(Arc::new(Int8Array::from(labels))))
    }
}

/// `swap_label(label)`: the label after swapping A and B (0 <-> 1, tie stays, null stays).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SwapLabel {
    signature: Signature,
}

impl Default for SwapLabel {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for SwapLabel {
    fn name(&self) -> &str {
        "swap_label"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match arg_types {
            [t] if is_integer(t) => Ok(vec![DataType::Int8]),
            other => plan_err!("swap_label takes one integer label (0, 1 or 2), got {other:?}"),
        }
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let labels = args.args[0].to_array(args.number_rows)?;
        let labels = labels.as_primitive::<datafusion::arrow::datatypes::Int8Type>();
        let mut out = Vec::with_capacity(labels.len());
        for row in 0..labels.len() {
            if labels.is_null(row) {
                out.push(None);
                continue;
            }
            let label = labels.value(row);
            if !(LABEL_A..=LABEL_TIE).contains(&label) {
                return exec_err!("swap_label: label {label} is not 0 (A), 1 (B) or 2 (tie)");
            }
            out.push(Some(swap(label)));
        }
        Ok(ColumnarValue::Array(Arc::new(Int8Array::from(out))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swapping_twice_is_the_identity() {
        for label in [LABEL_A, LABEL_B, LABEL_TIE] {
            assert_eq!(swap(swap(label)), label);
        }
        assert_eq!(swap(LABEL_A), LABEL_B);
        assert_eq!(swap(LABEL_TIE), LABEL_TIE);
    }

    #[test]
    fn one_hot_is_strict() {
        assert_eq!(one_hot_label(0, 0, 1), Ok(LABEL_TIE));
        assert!(one_hot_label(1, 1, 0).is_err());
        assert!(one_hot_label(0, 0, 0).is_err());
        assert!(one_hot_label(2, 0, 0).is_err());
    }
}
