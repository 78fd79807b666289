//! `log_loss(label, p_a, p_b, p_tie)`: mean multi-class log loss, as scikit-learn's
//! `log_loss(y, p, eps=1e-15)`: clip each probability to [eps, 1 - eps], renormalise each
//! row to sum 1, average -ln p[label]. Rows with a null argument are ignored.

use std::sync::Arc;

use crate::exact_sum::ExactSum;
use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Float64Type, Int64Type, UInt64Type};
use datafusion::common::{exec_err, plan_err, Result, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{Accumulator, AggregateUDFImpl, Signature, Volatility};

pub const LOG_LOSS_EPS: f64 = 1e-15;

/// One row's loss, scikit-learn's way.
pub fn row_log_loss(label: usize, p: [f64; 3]) -> f64 {
    let clipped = p.map(|v| v.clamp(LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS));
    let sum: f64 = clipped.iter().sum();
    -(clipped[label] / sum).ln()
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct LogLoss {
    signature: Signature,
}

impl Default for LogLoss {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl AggregateUDFImpl for LogLoss {
    fn name(&self) -> &str {
        "log_loss"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match arg_types {
            [label, a, b, t]
                if (label.is_integer() || label.is_null())
                    && [a, b, t].iter().all(|t| t.is_numeric() || t.is_null()) =>
            {
                Ok(vec![
                    DataType::Int64,
                    DataType::Float64,
                    DataType::Float64,
                    DataType::Float64,
                ])
            }
            other => plan_err!("log_loss takes (label 0/1/2, p_a, p_b, p_tie), got {other:?}"),
        }
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }
    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::<LogLossAccumulator>::default())
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(Field::new(
                format!("{}[sum]", args.name),
                DataType::Binary,
                true,
            )),
            Arc::new(Field::new(
                format!("{}[count]", args.name),
                DataType::UInt64,
                true,
            )),
        ])
    }
}

#[derive(Debug, Default)]
struct LogLossAccumulator {
    /// Order-independent: the same bits however partitions merge.
    sum: ExactSum,
    count: u64,
}

impl Accumulator for LogLossAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let label = cast(&values[0], &DataType::Int64)?;
        let label = label.as_primitive::<Int64Type>();
        let probs = values[1..]
            .iter()
            .map(|v| Ok(cast(v, &DataType::Float64)?))
            .collect::<Result<Vec<ArrayRef>>>()?;
        let [pa, pb, pt] = [0, 1, 2].map(|i| probs[i].as_primitive::<Float64Type>());
        for row in 0..label.len() {
            if label.is_null(row) || pa.is_null(row) || pb.is_null(row) || pt.is_null(row) {
                continue;
            }
            let class = label.value(row);
            if !(0..=2).contains(&class) {
                return exec_err!("log_loss: label {class} is not 0 (A), 1 (B) or 2 (tie)");
            }
            let p = [pa.value(row), pb.value(row), pt.value(row)];
            if p.iter().any(|v| !v.is_finite()) {
                return exec_err!(
                    "log_loss: row {row} of the batch has probabilities {p:?}; expected finite numbers"
                );
            }
            self.sum.add(row_log_loss(class as usize, p))?;
            self.count += 1;
        }
        Ok(())
    }
    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Float64(
            (self.count > 0).then(|| self.sum.value() / self.count as f64),
        ))
    }
    fn size(&self) -> usize {
        std::mem::size_of_val(self)
    }
    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![
            ScalarValue::Binary(Some(ExactSum::to_bytes(&[self.sum]))),
            ScalarValue::UInt64(Some(self.count)),
        ])
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let sums = states[0].as_binary::<i32>();
        let counts = states[1].as_primitive::<UInt64Type>();
        for row in 0..sums.len() {
            if !sums.is_null(row) {
                for sum in ExactSum::from_bytes(sums.value(row))? {
                    self.sum.merge(sum);
                }
                self.count += counts.value(row);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_hand_computed_losses() {
        assert!((row_log_loss(0, [1.0 / 3.0; 3]) - 3f64.ln()).abs() < 1e-15);
        assert!((row_log_loss(2, [0.5, 0.3, 0.2]) - 0.2f64.ln().abs()).abs() < 1e-15);
        // p = 0 is clipped to 1e-15 and the row renormalised by 1 + 1e-15.
        let expected = -(1e-15f64 / (1.0 + 1e-15)).ln();
        assert!((row_log_loss(0, [0.0, 0.5, 0.5]) - expected).abs() < 1e-12);
    }
}
