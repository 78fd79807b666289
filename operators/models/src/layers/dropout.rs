//! Seeded dropout for training: the mask of each dropout call is a function of a key the
//! trainer sets (seed, step, micro-batch, layer) and of the call's position within it, so
//! that a run is reproducible, a resumed run draws the masks the uninterrupted one drew,
//! and recomputing a layer (gradient checkpointing) draws the same masks again.

use std::cell::Cell;

use candle_core::Tensor;

use crate::error::{ModelError, Result};
use crate::weights::SplitMix64;

thread_local! {
    /// The key of the current pass and the number of dropout calls made under it.
    static STREAM: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
}

/// Runs `f` with dropout masks drawn from `key`; calls under it are numbered from 0.
pub fn with_key<R>(key: u64, f: impl FnOnce() -> R) -> R {
    let before = STREAM.with(|s| s.replace(Some((key, 0))));
    let out = f();
    STREAM.with(|s| s.set(before));
    out
}

/// Mixes several numbers into one key.
pub fn key(parts: &[u64]) -> u64 {
    parts.iter().fold(0x243f_6a88_85a3_08d3, |h, &p| {
        SplitMix64::new(h ^ p.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64()
    })
}

/// Inverted dropout: each element kept with probability 1 − p and scaled by 1 / (1 − p).
pub fn dropout(xs: &Tensor, p: f64) -> Result<Tensor> {
    let (key, call) = STREAM
        .with(|s| {
            let current = s.get();
            if let Some((k, n)) = current {
                s.set(Some((k, n + 1)));
            }
            current
        })
        .ok_or_else(|| {
            ModelError::Input("dropout outside a seeded training pass (no dropout key set)".into())
        })?;
    let seed = self::key(&[key, call]);
    let keep = 1.0 / (1.0 - p);
    if xs.device().is_cuda() {
        // On a GPU the mask is a hash of (seed, element) drawn in the op's kernel, forward
        // and backward: the same key gives the same mask.
        return Ok(crate::ops::dropout::dropout(xs, seed, p as f32)?);
    }
    let mut rng = SplitMix64::new(seed);
    let mask: Vec<f32> = (0..xs.elem_count())
        .map(|_| {
            if rng.next_uniform() >= p {
                keep as f32
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
    Ok((xs * mask)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn masks_repeat_under_the_same_key_and_differ_across_keys() {
        let x = Tensor::ones((64, 32), DType::F32, &Device::Cpu).unwrap();
        let draw = |k: u64| {
            with_key(k, || {
                let a = dropout(&x, 0.25).unwrap().flatten_all().unwrap();
                let b = dropout(&x, 0.25).unwrap().flatten_all().unwrap();
                (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap())
            })
        };
        let (a1, b1) = draw(7);
        let (a2, b2) = draw(7);
        assert_eq!(a1, a2);
        assert_eq!(b1, b2);
        assert_ne!(a1, b1, "two calls under one key draw two masks");
        assert_ne!(draw(8).0, a1);
        let kept = a1.iter().filter(|&&v| v > 0.0).count() as f64 / a1.len() as f64;
        assert!((kept - 0.75).abs() < 0.05, "{kept}");
        assert!(a1.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        assert!(dropout(&x, 0.25).is_err(), "no key outside a pass");
    }
}
