//! `expected_calibration_error(label, p_a, p_b, p_tie [, bins])`: the top-label expected
//! calibration error (Guo et al. 2017): rows are binned by their confidence (the largest of
//! the three probabilities) into `bins` equal-width bins on [0, 1] (10 by default; a
//! confidence of exactly 1 falls in the last), and ECE = Σ_b (n_b / N) |accuracy_b −
//! mean confidence_b|, a row being accurate when its label is the arg-max (the first of
//! tied maxima). Rows with a null argument are ignored.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Float64Type, Int64Type};
use datafusion::common::{exec_err, plan_err, Result, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{Accumulator, AggregateUDFImpl, Signature, Volatility};

use crate::exact_sum::ExactSum;
use crate::lists::{float64_list, float64_list_scalar};

pub const DEFAULT_BINS: usize = 10;

/// Per bin: rows, accurate rows, summed confidence (order-independent: the same bits
/// however partitions merge).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bins {
    pub rows: Vec<f64>,
    pub correct: Vec<f64>,
    pub confidence: Vec<ExactSum>,
}

impl Bins {
    pub fn new(n: usize) -> Self {
        Self {
            rows: vec![0.0; n],
            correct: vec![0.0; n],
            confidence: vec![ExactSum::default(); n],
        }
    }

    pub fn add(&mut self, label: usize, p: [f64; 3]) -> Result<()> {
        let top = crate::softmax::argmax3(p);
        let confidence = p[top];
        let n = self.rows.len();
        let bin = ((confidence * n as f64).floor() as usize).min(n - 1);
        self.rows[bin] += 1.0;
        self.correct[bin] += f64::from(u8::from(top == label));
        self.confidence[bin].add(confidence)
    }

    pub fn ece(&self) -> Option<f64> {
        let total: f64 = self.rows.iter().sum();
        (total > 0.0).then(|| {
            (0..self.rows.len())
                .filter(|&b| self.rows[b] > 0.0)
                .map(|b| (self.correct[b] - self.confidence[b].value()).abs() / total)
                .sum()
        })
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ExpectedCalibrationError {
    signature: Signature,
}

impl Default for ExpectedCalibrationError {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl AggregateUDFImpl for ExpectedCalibrationError {
    fn name(&self) -> &str {
        "expected_calibration_error"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let numeric = |t: &DataType| t.is_numeric() || t.is_null();
        match arg_types {
            [label, a, b, t] if (label.is_integer() || label.is_null()) && [a, b, t].into_iter().all(numeric) => {
                Ok(vec![DataType::Int64, DataType::Float64, DataType::Float64, DataType::Float64])
            }
            [label, a, b, t, bins]
                if (label.is_integer() || label.is_null())
                    && [a, b, t].into_iter().all(numeric)
                    && bins.is_integer() =>
            {
                Ok(vec![
                    DataType::Int64,
                    DataType::Float64,
                    DataType::Float64,
                    DataType::Float64,
                    DataType::Int64,
                ])
            }
            other => plan_err!(
                "expected_calibration_error takes (label 0/1/2, p_a, p_b, p_tie [, bins]), got {other:?}"
            ),
        }
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }
    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::<EceAccumulator>::default())
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let field = |what: &str, data_type: DataType| {
            Arc::new(Field::new(
                format!("{}[{what}]", args.name),
                data_type,
                true,
            ))
        };
        Ok(vec![
            field("rows", float64_list()),
            field("correct", float64_list()),
            field("confidence", DataType::Binary),
        ])
    }
}

#[derive(Debug, Default)]
struct EceAccumulator {
    bins: Option<Bins>,
}

impl EceAccumulator {
    fn bins(&mut self, n: usize) -> Result<&mut Bins> {
        if n == 0 || n > 1000 {
            return exec_err!("expected_calibration_error: {n} bins; expected 1 to 1000");
        }
        let bins = self.bins.get_or_insert_with(|| Bins::new(n));
        if bins.rows.len() != n {
            return exec_err!(
                "expected_calibration_error: one group asks for {} and {n} bins",
                bins.rows.len()
            );
        }
        Ok(bins)
    }
}

impl Accumulator for EceAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let label = cast(&values[0], &DataType::Int64)?;
        let label = label.as_primitive::<Int64Type>();
        let probs = values[1..4]
            .iter()
            .map(|v| Ok(cast(v, &DataType::Float64)?))
            .collect::<Result<Vec<ArrayRef>>>()?;
        let [pa, pb, pt] = [0, 1, 2].map(|i| probs[i].as_primitive::<Float64Type>());
        let bins = match values.get(4) {
            Some(b) => Some(cast(b, &DataType::Int64)?),
            None => None,
        };
        for row in 0..label.len() {
            if label.is_null(row) || pa.is_null(row) || pb.is_null(row) || pt.is_null(row) {
                continue;
            }
            let class = label.value(row);
            if !(0..=2).contains(&class) {
                return exec_err!(
                    "expected_calibration_error: label {class} is not 0 (A), 1 (B) or 2 (tie)"
                );
            }
            let n = match &bins {
                Some(b) if !b.is_null(row) => {
                    b.as_primitive::<Int64Type>().value(row).max(0) as usize
                }
                _ => DEFAULT_BINS,
            };
            let p = [pa.value(row), pb.value(row), pt.value(row)];
            if p.iter().any(|v| !v.is_finite()) {
                return exec_err!(
                    "expected_calibration_error: row {row} of the batch has probabilities {p:?}; expected finite numbers"
                );
            }
            self.bins(n)?.add(class as usize, p)?;
        }
        Ok(())
    }
    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Float64(self.bins.as_ref().and_then(Bins::ece)))
    }
    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.bins.as_ref().map_or(0, |b| 3 * 8 * b.rows.len())
    }
    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let list = |v: Option<&Vec<f64>>| float64_list_scalar(v.map(|v| v.as_slice()));
        let b = self.bins.as_ref();
        Ok(vec![
            list(b.map(|b| &b.rows))?,
            list(b.map(|b| &b.correct))?,
            ScalarValue::Binary(b.map(|b| ExactSum::to_bytes(&b.confidence))),
        ])
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [rows, correct] = [0, 1].map(|i| states[i].as_list::<i32>());
        let confidence = states[2].as_binary::<i32>();
        for r in 0..rows.len() {
            if rows.is_null(r) {
                continue;
            }
            let values = |l: &datafusion::arrow::array::ListArray| {
                l.value(r).as_primitive::<Float64Type>().values().to_vec()
            };
            let (n, c) = (values(rows), values(correct));
            let f = ExactSum::from_bytes(confidence.value(r))?;
            let bins = self.bins(n.len())?;
            if f.len() != n.len() {
                return exec_err!(
                    "expected_calibration_error: a state of {} and {} bins",
                    n.len(),
                    f.len()
                );
            }
            for b in 0..n.len() {
                bins.rows[b] += n[b];
                bins.correct[b] += c[b];
                bins.confidence[b].merge(f[b]);
            }
        }
        Ok(())
    }
}
