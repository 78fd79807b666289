//! `ensure(condition, message)`: true, or the query fails with `message`. Plans use it
//! for checks that must stop a run (coverage, uniqueness), not just print.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{exec_err, plan_err, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Ensure {
    signature: Signature,
}

impl Default for Ensure {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for Ensure {
    fn name(&self) -> &str {
        "ensure"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match arg_types {
            [DataType::Boolean | DataType::Null, m] if m.is_string() || m.is_null() => {
                Ok(vec![DataType::Boolean, DataType::Utf8])
            }
            other => plan_err!("ensure takes (boolean condition, string message), got {other:?}"),
        }
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Boolean)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let conditions = args.args[0].to_array(args.number_rows)?;
        let messages = args.args[1].to_array(args.number_rows)?;
        let (conditions, messages) = (conditions.as_boolean(), messages.as_string::<i32>());
        for row in 0..conditions.len() {
            if conditions.is_null(row) || !conditions.value(row) {
                let message = if messages.is_null(row) {
                    "ensure failed"
                } else {
                    messages.value(row)
                };
                return exec_err!("check failed: {message}");
            }
        }
        Ok(ColumnarValue::Array(Arc::new(BooleanArray::from(
            vec![true; conditions.len()],
        ))))
    }
}
