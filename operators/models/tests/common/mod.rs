//! Helpers shared by the models crate's integration tests (`mod common;` in each).
#![allow(dead_code)] // each test crate uses its own share of them

use arenaflow_models::models::classifier::SequenceClassifier;
use arenaflow_models::models::{PaddedBatch, PaddingSide};
use candle_core::{DType, Tensor};

/// The model's logits for `rows` (right-padded with its pad token, 0 without one).
pub fn logits_of(model: &SequenceClassifier, rows: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let batch =
        PaddedBatch::pad(&refs, model.pad_token_id().unwrap_or(0), PaddingSide::Right).unwrap();
    model
        .forward_t(&batch, false)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// The logits of two fixed rows of the fixtures' vocabulary (lengths 5 and 7).
pub fn fixture_logits(model: &SequenceClassifier) -> Vec<Vec<f32>> {
    logits_of(model, &[vec![1, 5, 9, 13, 2], vec![3, 7, 11, 4, 8, 6, 10]])
}

/// The largest |a - b| of two tensors of one shape, compared in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}
