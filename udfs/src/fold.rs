//! `fold_of(id, k, seed) OVER (PARTITION BY label)`: seeded, stratified k-fold assignment.
//!
//! Within a window partition the rows are ordered by (xxh3-64 of the id with the seed, id)
//! and dealt to folds 0, 1, ..., k-1 in turn: each fold gets its share of every partition
//! to within one row, and an id's fold depends on the set of rows, never on their order.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int32Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Int64Type};
use datafusion::common::{exec_err, plan_err, Result};
use datafusion::logical_expr::function::{PartitionEvaluatorArgs, WindowUDFFieldArgs};
use datafusion::logical_expr::{PartitionEvaluator, Signature, Volatility, WindowUDFImpl};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The key that orders rows before they are dealt to folds.
pub fn fold_key(id: &str, seed: u64) -> u64 {
    xxh3_64_with_seed(id.as_bytes(), seed)
}

/// Folds for one stratum: `ids[i]` gets `folds[i]`.
pub fn assign_folds(ids: &[&str], k: u32, seed: u64) -> Vec<i32> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| (fold_key(ids[i], seed), ids[i]));
    let mut folds = vec![0; ids.len()];
    for (rank, &i) in order.iter().enumerate() {
        folds[i] = (rank % k as usize) as i32;
    }
    folds
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct FoldOf {
    signature: Signature,
}

impl Default for FoldOf {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl WindowUDFImpl for FoldOf {
    fn name(&self) -> &str {
        "fold_of"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match arg_types {
            [id, k, seed] if (id.is_integer() || matches!(id, DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8))
                && k.is_integer()
                && seed.is_integer() =>
            {
                Ok(vec![DataType::Utf8, DataType::Int64, DataType::Int64])
            }
            other => plan_err!("fold_of takes (id, k, seed) with a string or integer id and integer k and seed, got {other:?}"),
        }
    }
    fn partition_evaluator(
        &self,
        _args: PartitionEvaluatorArgs,
    ) -> Result<Box<dyn PartitionEvaluator>> {
        Ok(Box::new(FoldEvaluator))
    }
    fn field(&self, field_args: WindowUDFFieldArgs) -> Result<FieldRef> {
        Ok(Arc::new(Field::new(
            field_args.name(),
            DataType::Int32,
            false,
        )))
    }
}

#[derive(Debug)]
struct FoldEvaluator;

impl PartitionEvaluator for FoldEvaluator {
    fn evaluate_all(&mut self, values: &[ArrayRef], num_rows: usize) -> Result<ArrayRef> {
        let ids = cast(&values[0], &DataType::Utf8)?;
        let ids = ids.as_string::<i32>();
        let k = cast(&values[1], &DataType::Int64)?;
        let seed = cast(&values[2], &DataType::Int64)?;
        let (k, seed) = (
            k.as_primitive::<Int64Type>(),
            seed.as_primitive::<Int64Type>(),
        );
        if num_rows == 0 {
            return Ok(Arc::new(Int32Array::from(Vec::<i32>::new())));
        }
        if ids.null_count() > 0 || k.null_count() > 0 || seed.null_count() > 0 {
            return exec_err!("fold_of: id, k and seed must not be null");
        }
        let (k0, seed0) = (k.value(0), seed.value(0));
        if k.values().iter().any(|&v| v != k0) || seed.values().iter().any(|&v| v != seed0) {
            return exec_err!("fold_of: k and seed must be the same for every row");
        }
        if !(1..=i64::from(i32::MAX)).contains(&k0) {
            return exec_err!("fold_of: k must be at least 1, got {k0}");
        }
        let ids: Vec<&str> = ids.iter().map(|v| v.unwrap_or_default()).collect();
        Ok(Arc::new(Int32Array::from(assign_folds(
            &ids,
            k0 as u32,
            seed0 as u64,
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_do_not_depend_on_input_order() {
        let ids: Vec<String> = (0..101).map(|i| format!("row{i}")).collect();
        let forward: Vec<&str> = ids.iter().map(String::as_str).collect();
        let backward: Vec<&str> = forward.iter().rev().copied().collect();
        let a = assign_folds(&forward, 5, 2025);
        let mut b = assign_folds(&backward, 5, 2025);
        b.reverse();
        assert_eq!(a, b);
        let mut counts = [0; 5];
        a.iter().for_each(|&f| counts[f as usize] += 1);
        assert_eq!(counts, [21, 20, 20, 20, 20]);
        assert_ne!(a, assign_folds(&forward, 5, 7), "the seed must matter");
    }
}
