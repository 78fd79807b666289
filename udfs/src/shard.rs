//! `shard_of(id, n)`: which of `n` shards a row belongs to, from an xxh3-64 hash of its id
//! (seed 0), so every shard of a SLURM array job picks its rows without coordination, and
//! both orders of one id land in the same shard.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, Int32Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::common::{exec_err, plan_err, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};
use xxhash_rust::xxh3::xxh3_64;

/// The shard (0..n) of an id.
pub fn shard_of(id: &str, n: u32) -> u32 {
    (xxh3_64(id.as_bytes()) % n as u64) as u32
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ShardOf {
    signature: Signature,
}

impl Default for ShardOf {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for ShardOf {
    fn name(&self) -> &str {
        "shard_of"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match arg_types {
            [id, n]
                if (id.is_integer()
                    || matches!(
                        id,
                        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8
                    ))
                    && n.is_integer() =>
            {
                Ok(vec![DataType::Utf8, DataType::Int64])
            }
            other => plan_err!("shard_of takes an id and a shard count, got {other:?}"),
        }
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int32)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let ids = args.args[0].to_array(args.number_rows)?;
        let ids = cast(&ids, &DataType::Utf8)?;
        let ids = ids.as_string::<i32>();
        let counts = args.args[1].to_array(args.number_rows)?;
        let counts = counts.as_primitive::<Int64Type>();
        let mut out = Vec::with_capacity(ids.len());
        for row in 0..ids.len() {
            if ids.is_null(row) || counts.is_null(row) {
                out.push(None);
                continue;
            }
            let n = counts.value(row);
            if !(1..=u32::MAX as i64).contains(&n) {
                return exec_err!("shard_of: the shard count must be at least 1, got {n}");
            }
            out.push(Some(shard_of(ids.value(row), n as u32) as i32));
        }
        Ok(ColumnarValue::Array(Arc::new(Int32Array::from(out))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_ids_evenly_and_stably() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[shard_of(&format!("id-{i}"), 4) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (900..1100).contains(&c)),
            "{counts:?}"
        );
        // Pinned against Python's xxhash (xxh3_64_intdigest), so shards never move.
        assert_eq!(xxh3_64(b"30192"), 0xf103_6802_7ed4_37e4);
        assert_eq!(shard_of("x", 4), 1);
        assert_eq!(shard_of("id-7", 4), 3);
        assert_eq!(shard_of("x", 1), 0);
    }
}
