//! Helpers of the crate's unit tests.

use candle_core::{DType, Device, Tensor};

use crate::weights::SplitMix64;

/// A (rows, cols) f32 tensor on the CPU of normal draws times `scale`.
pub fn draw(rng: &mut SplitMix64, shape: (usize, usize), scale: f64) -> Tensor {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| (scale * rng.next_normal()) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A tensor's values as f32, flattened.
pub fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}
