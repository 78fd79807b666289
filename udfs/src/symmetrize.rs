//! `symmetrize(id, order, logits [, space])`: test-time augmentation over both A/B orders,
//! an aggregate over the rows of one comparison (`GROUP BY id`). It takes exactly one `ab`
//! row and one `ba` row of the id; the `ba` row's classes are swapped back (its A is the
//! comparison's B) and the two predictions averaged:
//! - `probability` (the default): the mean of softmax(z_ab) and swap(softmax(z_ba));
//! - `logit`: softmax of the mean of z_ab and swap(z_ba).
//!
//! Returns [P(A), P(B), P(tie)]. Rows pair by id, never by position (rule 5): an id with
//! one order only, two rows of one order, an order other than ab/ba, or two ids in one
//! group fails the query naming the id.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, UInt64Type};
use datafusion::common::{exec_err, plan_err, Result, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{Accumulator, AggregateUDFImpl, Signature, Volatility};

use crate::lists::{float64_list, float64_list_scalar};
use crate::softmax::{finite_logits, softmax3};

/// Where the two orders are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    Probability,
    Logit,
}

impl Space {
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        match name.trim() {
            "probability" => Ok(Self::Probability),
            "logit" => Ok(Self::Logit),
            other => Err(format!("space `{other}`: expected probability or logit")),
        }
    }
}

/// The A/B swap of three class values (A <-> B, tie stays).
pub fn swap_classes(v: [f64; 3]) -> [f64; 3] {
    [v[1], v[0], v[2]]
}

/// The symmetrized probabilities of one comparison from its two orders' logits.
pub fn symmetrize(ab: [f64; 3], ba: [f64; 3], space: Space) -> [f64; 3] {
    let ba = swap_classes(ba);
    match space {
        Space::Probability => {
            let (p, q) = (softmax3(ab), softmax3(ba));
            std::array::from_fn(|c| 0.5 * (p[c] + q[c]))
        }
        Space::Logit => softmax3(std::array::from_fn(|c| 0.5 * (ab[c] + ba[c]))),
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Symmetrize {
    signature: Signature,
}

impl Default for Symmetrize {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl AggregateUDFImpl for Symmetrize {
    fn name(&self) -> &str {
        "symmetrize"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let list = |t: &DataType| {
            matches!(t, DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _)
                if f.data_type().is_numeric())
        };
        match arg_types {
            [id, order, logits] if id.is_string() && order.is_string() && list(logits) => {
                Ok(vec![DataType::Utf8, DataType::Utf8, float64_list()])
            }
            [id, order, logits, space]
                if id.is_string() && order.is_string() && list(logits) && space.is_string() =>
            {
                Ok(vec![
                    DataType::Utf8,
                    DataType::Utf8,
                    float64_list(),
                    DataType::Utf8,
                ])
            }
            other => plan_err!(
                "symmetrize takes (id, order, logits [, 'probability' | 'logit']), got {other:?}"
            ),
        }
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(float64_list())
    }
    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::<SymmetrizeAccumulator>::default())
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let field = |what: &str, t: DataType| {
            Arc::new(Field::new(format!("{}[{what}]", args.name), t, true))
        };
        Ok(vec![
            field("id", DataType::Utf8),
            field("ab", float64_list()),
            field("ba", float64_list()),
            field("ab_rows", DataType::UInt64),
            field("ba_rows", DataType::UInt64),
            field("space", DataType::Utf8),
        ])
    }
}

#[derive(Debug, Default)]
struct SymmetrizeAccumulator {
    id: Option<String>,
    ab: Option<[f64; 3]>,
    ba: Option<[f64; 3]>,
    ab_rows: u64,
    ba_rows: u64,
    space: Option<String>,
}

impl SymmetrizeAccumulator {
    fn note_id(&mut self, id: &str) -> Result<()> {
        match &self.id {
            Some(seen) if seen != id => {
                exec_err!("symmetrize: one group holds ids {seen} and {id}; group the rows by id")
            }
            Some(_) => Ok(()),
            None => {
                self.id = Some(id.to_string());
                Ok(())
            }
        }
    }

    fn note_space(&mut self, space: &str) -> Result<()> {
        if let Err(e) = Space::parse(space) {
            return exec_err!("symmetrize: {e}");
        }
        self.space = Some(space.to_string());
        Ok(())
    }

    fn add(&mut self, order: &str, z: Option<[f64; 3]>) -> Result<()> {
        let id = self.id.clone().unwrap_or_default();
        let (slot, rows) = match order {
            "ab" => (&mut self.ab, &mut self.ab_rows),
            "ba" => (&mut self.ba, &mut self.ba_rows),
            other => {
                return exec_err!(
                    "symmetrize: id {id} has a row of order {other}; expected ab or ba"
                )
            }
        };
        *rows += 1;
        if *rows > 1 {
            return exec_err!("symmetrize: id {id} has {rows} rows of order {order}; expected one");
        }
        *slot = z;
        Ok(())
    }
}

fn logits_row(
    lists: &datafusion::arrow::array::ListArray,
    row: usize,
    id: &str,
) -> Result<Option<[f64; 3]>> {
    finite_logits(lists, row, "symmetrize", &format!("id {id}"))
}

impl Accumulator for SymmetrizeAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let ids = cast(&values[0], &DataType::Utf8)?;
        let ids = ids.as_string::<i32>();
        let orders = cast(&values[1], &DataType::Utf8)?;
        let orders = orders.as_string::<i32>();
        let logits = cast(&values[2], &float64_list())?;
        let logits = logits.as_list::<i32>();
        let spaces = match values.get(3) {
            Some(v) => Some(cast(v, &DataType::Utf8)?),
            None => None,
        };
        for row in 0..ids.len() {
            if ids.is_null(row) {
                return exec_err!("symmetrize: a row without an id");
            }
            let id = ids.value(row);
            self.note_id(id)?;
            if let Some(spaces) = &spaces {
                let spaces = spaces.as_string::<i32>();
                if !spaces.is_null(row) {
                    self.note_space(spaces.value(row))?;
                }
            }
            if orders.is_null(row) {
                return exec_err!("symmetrize: id {id} has a row without an order");
            }
            let z = logits_row(logits, row, id)?;
            self.add(orders.value(row), z)?;
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let Some(id) = &self.id else {
            return ScalarValue::try_from(&float64_list());
        };
        for (order, rows) in [("ab", self.ab_rows), ("ba", self.ba_rows)] {
            if rows == 0 {
                return exec_err!(
                    "symmetrize: id {id} has no {order} row; TTA needs both orders of every id"
                );
            }
        }
        let space = Space::parse(self.space.as_deref().unwrap_or("probability"))
            .map_err(datafusion::common::DataFusionError::Execution)?;
        let (Some(ab), Some(ba)) = (self.ab, self.ba) else {
            // A null prediction in either order: no symmetrized one.
            return ScalarValue::try_from(&float64_list());
        };
        float64_list_scalar(Some(&symmetrize(ab, ba, space)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.id.as_ref().map_or(0, String::capacity)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let list = |z: Option<[f64; 3]>| float64_list_scalar(z.as_ref().map(|z| z.as_slice()));
        Ok(vec![
            ScalarValue::Utf8(self.id.clone()),
            list(self.ab)?,
            list(self.ba)?,
            ScalarValue::UInt64(Some(self.ab_rows)),
            ScalarValue::UInt64(Some(self.ba_rows)),
            ScalarValue::Utf8(self.space.clone()),
        ])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let ids = states[0].as_string::<i32>();
        let ab = states[1].as_list::<i32>();
        let ba = states[2].as_list::<i32>();
        let ab_rows = states[3].as_primitive::<UInt64Type>();
        let ba_rows = states[4].as_primitive::<UInt64Type>();
        let spaces = states[5].as_string::<i32>();
        for row in 0..ids.len() {
            if ids.is_null(row) {
                continue;
            }
            let id = ids.value(row).to_string();
            self.note_id(&id)?;
            if !spaces.is_null(row) {
                self.note_space(spaces.value(row))?;
            }
            for (order, lists, rows) in [("ab", ab, ab_rows), ("ba", ba, ba_rows)] {
                for _ in 0..rows.value(row) {
                    let z = logits_row(lists, row, &id)?;
                    self.add(order, z)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swapping_the_orders_swaps_the_answer() {
        let (ab, ba) = ([1.5, -0.5, 0.2], [0.3, 0.9, -1.0]);
        for space in [Space::Probability, Space::Logit] {
            let p = symmetrize(ab, ba, space);
            // The same comparison presented the other way round: B first.
            let q = symmetrize(ba, ab, space);
            for (swapped, other) in swap_classes(p).iter().zip(q) {
                assert!((swapped - other).abs() < 1e-15);
            }
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn identical_responses_get_equal_chances() {
        // Identical responses: both orders are the same input, so the same logits.
        let z = [1.0, 0.2, 0.5];
        for space in [Space::Probability, Space::Logit] {
            let p = symmetrize(z, z, space);
            assert_eq!(p[0], p[1]);
        }
    }
}
