//! `softmax3(logits)` or `softmax3(z_a, z_b, z_tie)`: three logits to probabilities;
//! `argmax3(a, b, tie)`: the predicted class (0, 1 or 2; the first of tied maxima).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Builder, ListBuilder};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type};

use crate::lists::float64_list;
use datafusion::common::{exec_err, plan_err, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

/// Softmax of three logits, shifted by the maximum so large logits do not overflow.
pub fn softmax3(z: [f64; 3]) -> [f64; 3] {
    let max = z[0].max(z[1]).max(z[2]);
    let e = z.map(|v| (v - max).exp());
    let sum = e[0] + e[1] + e[2];
    e.map(|v| v / sum)
}

/// Row `row` of a List<Float64> array as three finite logits, or None for a null row;
/// `function` and `whose` ("row 3 of the batch", "id 42") name it in the error.
pub fn finite_logits(
    lists: &datafusion::arrow::array::ListArray,
    row: usize,
    function: &str,
    whose: &str,
) -> Result<Option<[f64; 3]>> {
    if lists.is_null(row) {
        return Ok(None);
    }
    let values = lists.value(row);
    let values = values.as_primitive::<Float64Type>();
    if values.len() != 3 || values.null_count() > 0 {
        return exec_err!(
            "{function}: {whose} has {} logits ({} null); expected 3",
            values.len(),
            values.null_count()
        );
    }
    let z = [values.value(0), values.value(1), values.value(2)];
    if z.iter().any(|v| !v.is_finite()) {
        return exec_err!("{function}: {whose} has a logit that is not finite: {z:?}");
    }
    Ok(Some(z))
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Softmax3 {
    signature: Signature,
}

impl Default for Softmax3 {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for Softmax3 {
    fn name(&self) -> &str {
        "softmax3"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match arg_types {
            [DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, 3)]
                if f.data_type().is_numeric() =>
            {
                Ok(vec![float64_list()])
            }
            [a, b, c] if [a, b, c].iter().all(|t| t.is_numeric() || t.is_null()) => {
                Ok(vec![DataType::Float64; 3])
            }
            other => plan_err!(
                "softmax3 takes a list of three logits or three numeric logits, got {other:?}"
            ),
        }
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(float64_list())
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let mut logits: Vec<Option<[f64; 3]>> = Vec::with_capacity(n);
        if args.args.len() == 1 {
            let lists = args.args[0].to_array(n)?;
            let lists = lists.as_list::<i32>();
            for row in 0..n {
                if lists.is_null(row) {
                    logits.push(None);
                    continue;
                }
                let values = lists.value(row);
                let values = cast(&values, &DataType::Float64)?;
                let values = values.as_primitive::<Float64Type>();
                if values.len() != 3 || values.null_count() > 0 {
                    return exec_err!(
                        "softmax3: row {row} of the batch has {} logits ({} null); expected 3",
                        values.len(),
                        values.null_count()
                    );
                }
                logits.push(Some([values.value(0), values.value(1), values.value(2)]));
            }
        } else {
            let columns = args
                .args
                .iter()
                .map(|a| Ok(cast(&a.to_array(n)?, &DataType::Float64)?))
                .collect::<Result<Vec<ArrayRef>>>()?;
            let [a, b, c] = [0, 1, 2].map(|i| columns[i].as_primitive::<Float64Type>());
            for row in 0..n {
                logits.push(if a.is_null(row) || b.is_null(row) || c.is_null(row) {
                    None
                } else {
                    Some([a.value(row), b.value(row), c.value(row)])
                });
            }
        }
        let mut builder = ListBuilder::new(Float64Builder::with_capacity(3 * n));
        for z in logits {
            match z {
                Some(z) => {
                    builder.values().append_slice(&softmax3(z));
                    builder.append(true);
                }
                None => builder.append_null(),
            }
        }
        Ok(ColumnarValue::Array(Arc::new(builder.finish())))
    }
}

/// The class with the largest of three values, the first of tied maxima.
pub fn argmax3(v: [f64; 3]) -> usize {
    (0..3).fold(0, |b, c| if v[c] > v[b] { c } else { b })
}

/// `argmax3(a, b, tie)`: 0, 1 or 2 (Int8, as labels are); null when any value is.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Argmax3 {
    signature: Signature,
}

impl Default for Argmax3 {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for Argmax3 {
    fn name(&self) -> &str {
        "argmax3"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match arg_types {
            [a, b, c] if [a, b, c].iter().all(|t| t.is_numeric() || t.is_null()) => {
                Ok(vec![DataType::Float64; 3])
            }
            other => plan_err!("argmax3 takes three numbers, got {other:?}"),
        }
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let columns = args
            .args
            .iter()
            .map(|a| Ok(cast(&a.to_array(n)?, &DataType::Float64)?))
            .collect::<Result<Vec<ArrayRef>>>()?;
        let [a, b, c] = [0, 1, 2].map(|i| columns[i].as_primitive::<Float64Type>());
        let out: datafusion::arrow::array::Int8Array = (0..n)
            .map(|row| {
                (!(a.is_null(row) || b.is_null(row) || c.is_null(row)))
                    .then(|| argmax3([a.value(row), b.value(row), c.value(row)]) as i8)
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
