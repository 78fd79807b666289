//! List types and list scalars the functions share.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::common::{Result, ScalarValue};

/// `List<element>` with nullable items, as SQL list literals are.
pub fn list_of(element: DataType) -> DataType {
    DataType::List(Arc::new(Field::new_list_field(element, true)))
}

/// `List<Float64>`: logits, probabilities, fitted parameters.
pub fn float64_list() -> DataType {
    list_of(DataType::Float64)
}

/// A `List<Float64>` scalar of `values`, or a null one.
pub fn float64_list_scalar(values: Option<&[f64]>) -> Result<ScalarValue> {
    match values {
        Some(values) => {
            let values: Vec<ScalarValue> = values
                .iter()
                .map(|v| ScalarValue::Float64(Some(*v)))
                .collect();
            Ok(ScalarValue::List(ScalarValue::new_list_nullable(
                &values,
                &DataType::Float64,
            )))
        }
        None => ScalarValue::try_from(&float64_list()),
    }
}
